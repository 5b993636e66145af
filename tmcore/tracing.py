"""What one traced forward did: per-block token counts, final sizes and the source map."""

from __future__ import annotations

from torch import Tensor

from tmcore.errors import InvalidInputError, TraceError
from tmcore.plan import source_matrix, spread

__all__ = ["Trace"]


class Trace:
    """What one traced forward did; filled in by the last block.

    Every forward inside the trace starts it afresh, so it never mixes two forwards: after one
    that stopped partway (it raised, or ran only some blocks), ``token_counts`` holds the blocks
    it entered and `sizes`, `source` and `valid` are ``None``.

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
        finished: the last forward ran through the last block.
        merged_counts: block scope only (`tmcore.ModelInfo.scope` ``"block"``, where every block
            hands back all its tokens): per block, the tokens its merged sub-layers ran on (the
            block's token count where it merged nothing); empty in model scope.
        groups: block scope only, while tracing: per block, ``[B, N]`` long, the merged slot of
            every token of the block (`tmcore.plan.destinations`), ``None`` where it merged
            nothing; for ``tmcore visualize``.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the previous forward (block 0 of every traced forward calls this)."""
        self.token_counts: list[int | Tensor] = []
        self.sizes: Tensor | None = None
        self.source: Tensor | None = None
        self.valid: Tensor | None = None
        self.masks: list[Tensor] = []
        self.merged_counts: list[int] = []
        self.groups: list[Tensor | None] = []
        self.finished = False

    def finish(self, count: int | Tensor, sizes: Tensor, source: Tensor | None, valid: Tensor | None) -> None:
        """Record what leaves the last block (the runtime calls this)."""
        self.token_counts.append(count)
        self.sizes, self.source, self.valid = sizes, source, valid
        self.finished = True

    def _source(self) -> Tensor:
        if not self.finished:
            if not self.token_counts:
                raise TraceError("no forward pass has run inside this trace yet")
            raise TraceError(
                f"the last forward inside this trace stopped after entering block {len(self.token_counts) - 1} "
                "(it raised, or ran only some blocks), so it has no final source map; run a complete forward"
            )
        if self.source is None:
            raise TraceError(
                "this forward ran in soft-mask training mode (model.train() with a reducer that trains "
                "thresholds): tokens are masked, not moved, so there is no source map; read trace.masks, "
                "or trace a forward in eval mode"
            )
        return self.source

    def source_matrix(self) -> Tensor:
        """ToMe's ``[B, M, N0]`` 0/1 matrix: row ``g`` marks the inputs merged into output ``g``."""
        source = self._source()
        return source_matrix(source, self.sizes.shape[1])

    def unmerge(self, y: Tensor) -> Tensor:
        """Bring ``[B, M, C]`` output tokens back to the ``[B, N0, C]`` input layout.

        Each input position gets its group's value; pruned positions get zeros.

        Raises:
            TraceError: no complete inference forward ran inside the trace.
            InvalidInputError: ``y`` is not ``[B, M, ...]`` for this forward's ``B`` and ``M``.
        """
        source = self._source()
        expected = (source.shape[0], self.sizes.shape[1])
        if not hasattr(y, "shape") or y.dim() != 3 or tuple(y.shape[:2]) != expected:
            shape = tuple(y.shape) if hasattr(y, "shape") else type(y).__name__
            raise InvalidInputError(
                f"Trace.unmerge(y) got y of shape {shape}; allowed: [batch, tokens, channels] with "
                f"batch={expected[0]} and tokens={expected[1]}, the traced forward's output tokens"
            )
        return spread(y, source)
