"""What one traced forward did: per-block token counts, final sizes and the source map."""

from __future__ import annotations

from torch import Tensor

from tmcore.plan import source_matrix

__all__ = ["Trace"]


class Trace:
    """What one traced forward did; filled in by the last block.

    Attributes:
        token_counts: tokens entering each block, then the count leaving the last block; an int
            per entry, or a ``[B]`` long tensor where samples in the batch differ (ragged batches;
            alive tokens under a soft mask). Fixed-shape plans (merging, pruning or both, per
            sample) always give ints.
        sizes: ``[B, M, 1]`` final token sizes (how many input tokens each output token stands for).
        source: ``[B, N0]`` long, the output slot of every input token (``-1`` where pruned);
            ``None`` in soft-mask (training) mode, where tokens are masked, not moved.
        valid: ``[B, M]`` bool, ``False`` on the final padding slots of a ragged batch, or ``None``.
        masks: soft-mask mode only: the ``[B, N0]`` keep mask after each block, straight-through
            (gradients reach the reducer's learned parameters, e.g. for a FLOPs loss).
    """

    def __init__(self) -> None:
        self.token_counts: list[int | Tensor] = []
        self.sizes: Tensor | None = None
        self.source: Tensor | None = None
        self.valid: Tensor | None = None
        self.masks: list[Tensor] = []

    def source_matrix(self) -> Tensor:
        """ToMe's ``[B, M, N0]`` 0/1 matrix: row ``g`` marks the inputs merged into output ``g``."""
        if self.source is None or self.sizes is None:
            raise RuntimeError("no forward pass has run inside this trace yet")
        return source_matrix(self.source, self.sizes.shape[1])

    def unmerge(self, y: Tensor) -> Tensor:
        """Bring ``[B, M, C]`` output tokens back to the ``[B, N0, C]`` input layout.

        Each input position gets its group's value; pruned positions get zeros.
        """
        if self.source is None:
            raise RuntimeError("no forward pass has run inside this trace yet")
        idx = self.source.clamp(min=0).unsqueeze(-1).expand(-1, -1, y.shape[-1])
        return y.gather(1, idx).masked_fill(self.source.unsqueeze(-1) < 0, 0)
