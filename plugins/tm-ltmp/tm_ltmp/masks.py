"""LTMP's scores and threshold masks (docs/algorithms.md 4.2, 4.3) as small pure tensor functions.

Conventions: ``B`` batch, ``N`` tokens, ``p`` protected prefix tokens, ``Na = ceil(N / 2)``
even-position tokens (set A, merge sources), ``Nb = floor(N / 2)`` odd-position tokens (set B,
merge destinations). CLS (position 0) lies in A; a distillation token (position 1) in B.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tmcore.compiling import per_shape
from tmcore.matching import best_partner, bipartite_scores, rank_key

__all__ = ["threshold_mask", "importance", "best_match", "output_order", "output_position", "concat_order"]


def threshold_mask(values: Tensor, threshold: Tensor, tau: float) -> Tensor:
    """Straight-through threshold mask (4.3): forward ``values > threshold`` as 0 / 1, backward
    the slope of ``sigmoid((values - threshold) / tau)``, so gradients reach ``threshold``.

    Args:
        values: ``[...]`` scores (``+-inf`` allowed: their mask is exact and gets no gradient).
        threshold: 0-d learnable threshold.
        tau: temperature of the sigmoid (training only).

    Returns:
        ``[...]`` float mask with hard 0 / 1 values.
    """
    soft = torch.sigmoid((values - threshold) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return soft + (hard - soft).detach()


def importance(attn: Tensor, num_protected: int, valid: Tensor | None = None, keep_top: bool = False) -> Tensor:
    """Importance of every token (4.2): the attention it receives, averaged over heads and
    query rows; protected tokens get ``+inf`` (never pruned).

    Args:
        attn: ``[B, H, N, N]`` attention probabilities (rows: queries, columns: keys).
        num_protected: ``p``, the protected prefix length.
        valid: ``[B, N]`` bool, real tokens of a ragged batch: only their query rows are
            averaged (padding rows are garbage) and padding tokens get ``-inf`` (never kept).
        keep_top: also give each sample's most important unprotected token ``+inf``, so a
            model that pools over the unprotected tokens never loses all of them.

    Returns:
        ``[B, N]`` importance, differentiable where finite.
    """
    b, h, n, _ = attn.shape
    if valid is None:
        imp = attn.mean(dim=(1, 2))
    else:
        # weighted mean over (head, query) as one [1, H*N] x [H*N, N] product per sample (an
        # einsum here reduced 8x slower on CPU)
        rows = valid.to(attn.dtype)
        weights = (rows / (rows.sum(1, keepdim=True) * h)).repeat(1, h).unsqueeze(1)
        imp = torch.bmm(weights, attn.reshape(b, h * n, n)).squeeze(1)
        imp = imp.masked_fill(~valid, -math.inf)
    protected = (torch.arange(n, device=attn.device) < num_protected).expand(b, n)
    if keep_top and n > num_protected:
        top = rank_key(imp.detach()[:, num_protected:]).argmax(1, keepdim=True) + num_protected
        protected = protected.scatter(1, top, True)
    return imp.masked_fill(protected, math.inf)


def best_match(
    keys: Tensor, num_protected: int, weight: Tensor | None = None, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Every A token's most similar B token (ToMe's bipartite matching, 4.2).

    Cosine similarity of the head-mean keys; protected tokens are neither sources nor
    destinations (their pairs score ``-inf``).

    Args:
        keys: ``[B, N, d]`` head-mean keys.
        num_protected: ``p``.
        weight: ``[B, N]`` training mode: normalised keys are multiplied by it (LTMP passes the
            detached soft mask, so dead tokens score 0 against everything, as in the original).
        valid: ``[B, N]`` bool, inference on a ragged batch: padding pairs score ``-inf``.

    Returns:
        ``(best [B, Na], idx [B, Na])``: the best similarity (``-inf`` when there is no allowed
        partner) and the B index (``0 <= idx < Nb``) it is reached at.
    """
    b, n, _ = keys.shape
    if n < 2:  # no B token left: nothing can merge
        empty = keys.new_full((b, (n + 1) // 2), -math.inf)
        return empty, torch.zeros(empty.shape, dtype=torch.long, device=keys.device)
    return best_partner(bipartite_scores(keys, num_protected, valid, weight))


@per_shape(maxsize=64)
def output_order(n: int, p: int, device: torch.device) -> Tensor:
    """``[N]`` long: input positions in LTMP's output order ``[protected, A \\ protected,
    B \\ protected]``. For ``p <= 1`` this is the original's ``[all A, all B]``; for larger ``p``
    (distillation, register tokens) the protected prefix stays in front."""
    # the even, then the odd positions after the prefix; no boolean indexing (meta-device runs)
    first_a, first_b = min(p + p % 2, n), min(p + 1 - p % 2, n)
    return torch.cat(
        [
            torch.arange(p, device=device),
            torch.arange(first_a, n, 2, device=device),
            torch.arange(first_b, n, 2, device=device),
        ]
    )


@per_shape(maxsize=64)
def output_position(n: int, p: int, device: torch.device) -> Tensor:
    """``[N]`` long: where each input position lands in `output_order` (its inverse)."""
    order = output_order(n, p, device)
    return torch.empty_like(order).scatter_(0, order, torch.arange(n, device=device))


@per_shape(maxsize=64)
def concat_order(n: int, p: int, device: torch.device) -> Tensor | None:
    """``output_order`` as indices into ``cat([A tokens, B tokens])``; ``None`` when it is the
    identity (``p <= 1``), so the common case costs no gather."""
    if p <= 1:
        return None
    order = output_order(n, p, device)
    return torch.where(order % 2 == 0, order // 2, (n + 1) // 2 + order // 2)
