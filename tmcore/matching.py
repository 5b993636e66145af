"""Decision primitives shared by reducers: ToMe's bipartite soft matching, and keeping the
highest-scoring tokens (the pruning half of PPT, EViT-style top-k).

Ties: every sort, top-k and arg-max here (and in the plugins' own matching) compares scores
through `rank_key` and is stable, so equal scores are decided by position, the same in any batch
and whatever the padding (`best_partner`: each row's best column, the first on ties)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tmcore.plan import Plan, pack

__all__ = [
    "bipartite_soft_matching",
    "bipartite_scores",
    "bipartite_plan",
    "rank_descending",
    "max_bipartite_r",
    "max_prune_r",
    "prune_lowest",
    "prune_lowest_in_order",
    "real_tokens",
    "rank_key",
    "best_partner",
    "TIE_STEP",
]


TIE_STEP = 2.0**-44
"""How far apart `rank_key` sets float64 scores of neighbouring positions (absolute)."""


def rank_key(score: Tensor, dim: int = -1, descending: bool = True) -> Tensor:
    """``score`` as sorts, arg-maxes and top-k compare it, so that ties go by position in any
    batch and whatever the padding.

    The same score computed for a sample alone and in a padded batch can come out a rounding
    error apart, and so can the scores of two identical tokens in one call: a matmul rounds by
    its tiling, which depends on the shape and on where an entry falls in it. That would let the
    padding, or the rest of the batch, break an exact tie either way. Float64 scores (the
    precision in which a sample gives exactly its result alone; the conformance suite runs in
    it) are therefore moved by ``TIE_STEP`` (6e-14) per position along ``dim``, down for a
    descending order (an earlier position wins a tie) and up for an ascending one: far more
    than the rounding errors (1e-16 to 1e-15) and far less than any real difference between
    scores (the largest shift, 1e-11 at 200 tokens). Other dtypes come back unchanged: in
    float32 and below a sample's tokens themselves carry its batch's rounding, and integer sort
    keys are exact.

    Args:
        score: any shape; ``-inf`` / ``inf`` entries stay as they are.
        dim: the axis that is sorted or searched.
        descending: the order the caller takes (``False`` for lowest-first).

    Returns:
        A tensor of ``score``'s shape and dtype, only to compare (not a score to use).
    """
    if score.dtype != torch.float64:
        return score
    n = score.shape[dim]
    shape = [1] * score.dim()
    shape[dim] = n
    step = torch.arange(n, device=score.device, dtype=score.dtype).mul_(TIE_STEP).view(shape)
    return score - step if descending else score + step


def best_partner(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's best column, the first on ties (`rank_key`).

    Args:
        scores: ``[..., Na, Nb]`` pair scores (``-inf`` for pairs that may not match).

    Returns:
        ``([..., Na] best score, [..., Na] long its column)``; the score as given, unmoved.
    """
    idx = rank_key(scores).argmax(dim=-1)
    return scores.gather(-1, idx.unsqueeze(-1)).squeeze(-1), idx


def max_bipartite_r(num_tokens: int, num_protected: int) -> int:
    """The most tokens one bipartite matching can remove: half of the unprotected tokens."""
    return max(num_tokens - num_protected, 0) // 2


def max_prune_r(num_tokens: int, num_protected: int) -> int:
    """The most tokens one block may drop: all of its unprotected tokens but one."""
    return max(num_tokens - num_protected - 1, 0)


def real_tokens(valid: Tensor, num_protected: int) -> Tensor:
    """``[B]`` long: unprotected real tokens per sample of a padded batch (``valid`` ``[B, N]``)."""
    return valid.sum(1) - num_protected


def bipartite_scores(
    metric: Tensor, num_protected: int = 0, valid: Tensor | None = None, weight: Tensor | None = None
) -> Tensor:
    """ToMe's split and similarity: every A token (even position) against every B token (odd).

    Args:
        metric: ``[B, N, d]`` similarity features (head-mean keys for ToMe).
        num_protected: ``p``; protected tokens are neither sources (their A rows) nor
            destinations (their B columns): those pairs score ``-inf``.
        valid: ``[B, N]`` bool padding mask; pairs with a padding token score ``-inf``.
        weight: ``[B, N]`` factor on each normalised feature (LTMP's soft mask in training, so
            removed tokens score 0 against every token).

    Returns:
        ``[B, ceil(N / 2), floor(N / 2)]`` cosine similarities.
    """
    n = metric.shape[1]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    if weight is not None:
        unit = unit * weight.unsqueeze(-1).to(unit.dtype)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)
    blocked = _protected_pairs(n, num_protected, metric.device)
    if valid is not None:
        blocked = blocked | ~(valid[:, ::2, None] & valid[:, None, 1::2])
    return scores.masked_fill(blocked, -math.inf)


def _protected_pairs(n: int, p: int, device: torch.device) -> Tensor:
    """``[ceil(N / 2), floor(N / 2)]`` bool: pairs whose A token or B token is protected."""
    a = torch.arange(0, n, 2, device=device) < p
    b = torch.arange(1, n, 2, device=device) < p
    return a[:, None] | b[None, :]


def rank_descending(score: Tensor) -> Tensor:
    """``[B, K]`` -> ``[B, K]`` long: positions by descending ``score``, ties by position
    (`rank_key`, stable)."""
    return rank_key(score).argsort(dim=-1, descending=True, stable=True)


def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int = 0, valid: Tensor | None = None) -> Plan:
    """ToMe's bipartite soft matching (docs/algorithms.md 1.3) with ``p`` protected prefix tokens:
    `bipartite_scores`, `best_partner`, `bipartite_plan`.

    Tokens split by position parity into A (even) and B (odd); every A token finds its most
    similar B token (cosine); the ``r`` A tokens with the best matches merge into their partner.
    Protected prefix tokens (class, distillation, register tokens) are never a source nor a
    destination. For ``p = 1`` and ``p = 2`` this is exactly the original's class /
    distillation-token handling.

    Args:
        metric: ``[B, N, d]`` similarity features (head-mean keys for ToMe).
        r: tokens to remove, ``0 <= r <= max_bipartite_r(N, p)``; callers clamp and warn.
        num_protected: ``p``, the length of the protected prefix.
        valid: ``[B, N]`` bool padding mask (real tokens first). Each sample then merges
            ``r_i = min(r, T_i // 2)`` of its ``T_i`` real unprotected tokens, exactly as it would
            alone: padding is never a source, a destination or counted.

    Returns:
        The Plan of `bipartite_plan`.
    """
    b, n, _ = metric.shape
    if not 0 <= r <= max_bipartite_r(n, num_protected):
        raise ValueError(
            f"r={r} is outside [0, {max_bipartite_r(n, num_protected)}] for {n} tokens, {num_protected} protected"
        )
    if r == 0:
        return Plan.prune(torch.arange(n, device=metric.device).expand(b, n), n, valid)
    with torch.no_grad():
        best, partner = best_partner(bipartite_scores(metric, num_protected, valid))
        each = None if valid is None else (real_tokens(valid, num_protected) // 2).clamp(max=r)
        return bipartite_plan(best, partner, r, n, num_protected, valid, each)


def bipartite_plan(
    best: Tensor,
    partner: Tensor,
    r: int,
    num_in: int,
    num_protected: int = 0,
    valid: Tensor | None = None,
    each: Tensor | None = None,
    num_out: int | None = None,
) -> Plan:
    """ToMe's ranking and merge plan from every A token's best B partner: the ``r`` A tokens
    with the best matches (`rank_descending`) merge into their partners.

    Output order, as in the original: ``[protected prefix, unmerged A, B]``. Unmerged A tokens
    keep their relative order when ``p > 0`` and come in descending-score order when ``p == 0``.

    Args:
        best, partner: ``[B, Na]`` from `best_partner` on `bipartite_scores` (``-inf`` for A
            tokens that may not merge, so they rank last), ``Na = ceil(N / 2)``.
        r: tokens to remove, ``1 <= r <= max_bipartite_r(N, p)``; with ``each``, the most any
            sample removes (the static number of merge entries).
        num_in: ``N``.
        num_protected: ``p``.
        valid: ``[B, N]`` bool padding mask (real tokens first), or ``None``.
        each: ``[B]`` long, padded batches: the tokens sample ``i`` removes (``<= r``).
        num_out: padded batches: the plan's static slot count (``N - r`` by default), at least
            every sample's count.

    Returns:
        A Plan from ``N`` to ``N - r`` tokens; with ``valid``, a ragged plan of ``num_out`` slots
        whose sample ``i`` holds its ``N_i - r_i`` tokens first, in the unpadded output order.
    """
    b, n_a = best.shape
    p, n = num_protected, num_in
    n_b = n // 2
    order = rank_descending(best)
    src_a = order[:, :r]  # A indices that merge away (lowest ones beyond each sample's r_i unused)
    device = best.device
    p_a, p_b = (p + 1) // 2, p // 2  # protected tokens that fall in A / in B
    if valid is None:
        unm_a = order[:, r:]
        if p:
            unm_a = unm_a.sort(dim=-1).values  # protected A tokens first, then original order
        unm_a = unm_a[:, p_a:]
        keep = torch.cat(
            [
                torch.arange(p, device=device).expand(b, p),
                unm_a * 2,
                (torch.arange(p_b, n_b, device=device) * 2 + 1).expand(b, n_b - p_b),
            ],
            dim=1,
        )
        src_dst = partner.gather(1, src_a) - p_b + p + (n_a - p_a - r)  # B token j sits after the unmerged A
        return Plan(keep=keep, src=src_a * 2, src_dst=src_dst, num_in=n)
    each = each if each is not None else torch.full((b,), r, dtype=torch.long, device=device)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_a, device=device).expand(b, n_a))
    merges = rank < each.unsqueeze(1)  # [B, Na]: the r_i best real A tokens of each sample
    a_real = valid[:, ::2]
    if p:  # unmerged A tokens keep their positional order after the prefix
        a_cand = torch.arange(p_a, n_a, device=device).expand(b, n_a - p_a)
        a_kept = (a_real & ~merges)[:, p_a:]
    else:  # ... or come in descending-score order
        a_cand = order
        a_kept = a_real.gather(1, order) & ~merges.gather(1, order)
    b_cand = torch.arange(p_b, n_b, device=device).expand(b, n_b - p_b)
    prefix = torch.arange(p, device=device).expand(b, p)
    candidates = torch.cat([prefix, a_cand * 2, b_cand * 2 + 1], dim=1)
    kept = torch.cat([valid[:, :p], a_kept, valid[:, 1::2][:, p_b:]], dim=1)
    # a sample that merges nothing stays as it is, like the unpadded r = 0 (matters for p = 0)
    still = (each == 0).unsqueeze(1)
    candidates = torch.where(still, torch.arange(n, device=device).expand(b, n), candidates)
    kept = torch.where(still, valid, kept)
    target = partner.gather(1, src_a) - p_b + p + a_cand.shape[1]
    target = torch.where(merges.gather(1, src_a), target, -1)
    return pack(candidates, kept, n, src_a * 2, target, num_out=n - r if num_out is None else num_out)


def prune_lowest(score: Tensor, r: int, num_protected: int = 0, valid: Tensor | None = None) -> Plan:
    """Drop the ``r`` lowest-scoring unprotected tokens of every sample.

    Output order: the protected prefix in place, then the kept tokens by descending score (the
    order PPT's pruning and EViT's top-k produce); equal scores keep their positional order.

    Args:
        score: ``[B, N]`` per-token score (e.g. class attention); the prefix's entries are ignored.
        r: tokens to drop, ``0 <= r <= N - num_protected``.
        num_protected: ``p``, the length of the protected prefix.
        valid: ``[B, N]`` bool padding mask (real tokens first). Sample ``i`` then drops
            ``r_i = min(r, T_i // 2)`` of its ``T_i`` real unprotected tokens (the cap of
            `bipartite_soft_matching`, so the two plans still pair up for `select`); padding is
            never kept ahead of a real token.

    Returns:
        A Plan from ``N`` to ``N - r`` tokens that lists the dropped tokens (``src`` with
        ``src_dst = -1``), so it has the shapes of `bipartite_soft_matching`'s plan for the
        same ``r`` and `tmcore.plan.select` can mix the two per sample.
    """
    b, n = score.shape
    p = num_protected
    if not 0 <= r <= n - p:
        raise ValueError(f"r={r} is outside [0, {n - p}] for {n} tokens, {p} protected")
    if valid is not None:
        if r > max_bipartite_r(n, p):
            raise ValueError(f"r={r} is outside [0, {max_bipartite_r(n, p)}] for a padded batch of {n} tokens")
        with torch.no_grad():
            ranked = rank_key(score[:, p:]).masked_fill(~valid[:, p:], -math.inf)
            order = ranked.argsort(dim=-1, descending=True, stable=True)
            t = real_tokens(valid, p)
            keep_count = t - (t // 2).clamp(max=r)
            kept = torch.arange(n - p, device=score.device) < keep_count.unsqueeze(1)
            prefix = torch.arange(p, device=score.device).expand(b, p)
            candidates = torch.cat([prefix, order + p], dim=1)
            kept = torch.cat([valid[:, :p], kept], dim=1)
            drop = order[:, n - p - r :] + p
        return pack(candidates, kept, n, drop, torch.full_like(drop, -1), num_out=n - r)
    with torch.no_grad():
        order = rank_key(score[:, p:]).argsort(dim=-1, descending=True, stable=True) + p
    prefix = torch.arange(p, device=score.device).expand(b, p)
    return Plan.prune(torch.cat([prefix, order[:, : n - p - r]], dim=1), n, drop=order[:, n - p - r :])


def _highest(dtype: torch.dtype) -> float | int:
    return torch.finfo(dtype).max if dtype.is_floating_point else torch.iinfo(dtype).max


def prune_lowest_in_order(score: Tensor, r: int, num_protected: int = 0, valid: Tensor | None = None) -> Plan:
    """Drop the ``r`` lowest-scoring unprotected tokens of every sample; keep the rest in their
    original order.

    Unlike `prune_lowest`, which outputs the kept tokens by descending score (the order PPT and
    EViT produce on purpose), survivors stay in input order: for random scores (tm-random) a
    score order would be a random permutation, which nothing asks for. The survivors are
    compacted with a prefix sum.

    Args:
        score: ``[B, N]`` per-token score (tm-random's integer sort keys); the prefix's entries
            are ignored. Among equal scores, the earlier position is dropped first.
        r: tokens to drop, ``0 <= r <= max_prune_r(N, num_protected)``.
        num_protected: ``p``, the length of the protected prefix (always kept, in front).
        valid: ``[B, N]`` bool padding mask (real tokens first). Sample ``i`` then drops
            ``r_i = min(r, T_i - 1)`` (at least 0) of its ``T_i`` real unprotected tokens, the
            count the cap gives it alone; padding is never kept.

    Returns:
        A Plan from ``N`` to ``N - r`` tokens; with ``valid``, a ragged plan (``Plan.valid``) of
        the same size (no host synchronisation) whose sample ``i`` holds its ``p + T_i - r_i``
        tokens first, as alone.
    """
    b, n = score.shape
    p = num_protected
    if not 0 <= r <= max_prune_r(n, p):
        raise ValueError(f"r={r} is outside [0, {max_prune_r(n, p)}] for {n} tokens, {p} protected")
    device = score.device
    prefix = torch.arange(p, device=device).expand(b, p)
    with torch.no_grad():
        rest = rank_key(score[:, p:], descending=False)
        if valid is None:
            drop = rest.argsort(dim=1, stable=True)[:, :r]  # [B, r], lowest first
            kept = torch.ones_like(rest, dtype=torch.bool).scatter_(1, drop, False)
            m = n - p - r
            slot = torch.where(kept, kept.cumsum(1) - 1, m)  # dropped tokens: a spare column m
            order = torch.arange(n - p, device=device).expand(b, n - p) + p
            keep = torch.zeros(b, m + 1, dtype=torch.long, device=device).scatter_(1, slot, order)[:, :m]
            return Plan.prune(torch.cat([prefix, keep], dim=1), n)
        # padding scores highest and comes after the real tokens, so a sample's r_i lowest are real
        rest = rest.masked_fill(~valid[:, p:], _highest(rest.dtype))
        drop = rest.argsort(dim=1, stable=True)[:, :r]  # [B, r], lowest first
        t = real_tokens(valid, p)
        r_i = (t - 1).clamp(min=0, max=r)  # a sample of 0 real tokens drops none
        dropped = torch.zeros_like(rest, dtype=torch.bool).scatter_(
            1, drop, torch.arange(r, device=device) < r_i.unsqueeze(1)
        )
        kept = torch.cat([valid[:, :p], valid[:, p:] & ~dropped], dim=1)
    return pack(torch.arange(n, device=device), kept, n, num_out=n - r)
