"""FLOP models: multiply-accumulates of a model's transformer blocks from its per-block token counts.

An adapter supplies one for each model it patches (`tmcore.Adapter.flops`), so ``tmcore bench``
reports FLOP ratios for any backbone. Tests check every adapter's model against
``torch.utils.flop_counter.FlopCounterMode`` (`tmcore.testing.AdapterConformance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["BlockFlops"]


@dataclass(frozen=True)
class BlockFlops:
    """The cost of one standard transformer block (multi-head self-attention, then a two-layer MLP).

    Attributes:
        dim: width ``C`` of the token stream.
        mlp_hidden: the MLP's hidden width (``4 C`` in ViT and BERT).
        attn_dim: width of q, k and v (``C`` unless the model says otherwise).
        position: where the reduction sits, ``attention`` (before the MLP: it runs on the reduced
            tokens), ``layer`` (after the block: the MLP runs on all of them) or ``start`` (before
            the attention, which reuses the probabilities of the tokens entering: MCTF's
            one-step-ahead attention).
    """

    dim: int
    mlp_hidden: int
    attn_dim: int | None = None
    position: str = "attention"

    def block(self, n: Any, n_out: Any) -> Any:
        """MACs of a block entered by ``n`` tokens and left by ``n_out`` (ints or ``[B]`` tensors):
        q, k, v and output projections ``4 n C a``, ``QK^T`` and ``AV`` ``2 n^2 a``, the MLP
        ``2 n' C H`` with ``n' = n_out`` when the reduction sits before it. At ``start``, q, k and
        ``QK^T`` run on the ``n`` tokens entering (``2 n C a + n^2 a``), the values, output
        projection, ``AV`` and MLP on the ``n_out`` left (``2 n_out C a + n_out^2 a + 2 n_out C H``)."""
        a = self.dim if self.attn_dim is None else self.attn_dim
        if self.position == "start":
            return (
                2 * n * self.dim * a
                + n * n * a
                + 2 * n_out * self.dim * a
                + n_out * n_out * a
                + (2 * n_out * self.dim * self.mlp_hidden)
            )
        n_mlp = n_out if self.position == "attention" else n
        return 4 * n * self.dim * a + 2 * n * n * a + 2 * n_mlp * self.dim * self.mlp_hidden

    def macs(self, token_counts: Sequence[Any]) -> Any:
        """Total MACs of all blocks: ``token_counts[l]`` enter block ``l``, the last entry leaves
        the last block (a trace's ``token_counts``; ``[B]`` tensors give per-sample totals)."""
        total = 0.0
        for n, n_out in zip(token_counts[:-1], token_counts[1:]):
            total = total + self.block(n, n_out)
        return total
