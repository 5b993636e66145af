"""`Scores`: what a reducer's ``score`` step hands to its ``match`` step in one block."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["Scores"]


@dataclass(frozen=True)
class Scores:
    """One block's scores, from ``TokenReducer.score`` to ``TokenReducer.match``.

    Every field is optional; a reducer fills those its matching reads, and its ``match`` reads
    them by name (``None`` from ``score`` means the block does nothing). Tensors come from the
    block's `tmcore.LayerInputs` or the tokens, after any reordering the reducer's own
    procedure asks for.

    Attributes:
        metric: ``[B, N, d]`` features similarity is measured on (head-mean keys for ToMe,
            the residual stream for MCTF).
        similarity: pair scores: ``[B, Na, Nb]`` between two token sets (`bipartite_scores`), or
            ``[B, T, T]`` between all unprotected tokens (PiToMe's energy).
        importance: ``[B, N]`` one score per token (class attention, significance, energy,
            random sort keys); the larger, the more a token is kept or weighs.
        attn: ``[B, H, N, N]`` attention probabilities the matching reads (MCTF).
        order: ``[B, N]`` long, a token order the procedure ranks by (PiToMe's energy order).
        count: tokens to remove in this block; on a padded batch, the most any sample removes
            (the static number of merge entries).
        each: ``[B]`` long, padded batches: the tokens each sample removes (``<= count``).
        slots: padded batches: the plan's static slot count (0: the procedure's default).
        extra: anything else a procedure needs, by name (documented by the reducer).
    """

    metric: Tensor | None = None
    similarity: Tensor | None = None
    importance: Tensor | None = None
    attn: Tensor | None = None
    order: Tensor | None = None
    count: int = 0
    each: Tensor | None = None
    slots: int = 0
    extra: dict[str, Tensor] = field(default_factory=dict)
