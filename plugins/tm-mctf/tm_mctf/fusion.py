"""MCTF's decision and merge pieces as pure tensor functions (Lee et al., CVPR 2024): the
multi-criteria attraction score, the merge amount rule, the bidirectional (two-step) bipartite
matching composed into one `tmcore.Plan`, and the merged attention of one-step-ahead attention.

Notation: ``N`` tokens, A = even positions (``Na = ceil(N / 2)``), B = odd positions
(``Nb = floor(N / 2)``), ``p`` protected prefix tokens (class, distillation, registers).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tmcore import Plan
from tmcore.matching import best_partner, bipartite_scores, rank_descending
from tmcore.plan import merge_tokens, pack, reduce

__all__ = [
    "attraction",
    "merge_count",
    "received_attention",
    "bidirectional_plan",
    "merged_attention",
    "MIN_TOKENS",
]

MIN_TOKENS = 10
"""The official floor: a block never leaves fewer than this many tokens (``t - r >= 10``)."""


def merge_count(t: int | Tensor, r: float, num_protected: int) -> int | Tensor:
    """Tokens one merging block removes from ``t`` tokens (the official rule, made safe).

    ``r >= 1`` (an int) is a count, ``0 < r < 1`` a fraction of the ``t - p`` unprotected tokens
    (floored); at least ``MIN_TOKENS`` tokens stay, at most half of the unprotected ones merge,
    and never fewer than 0 (the official code can go negative below 10 tokens).

    Args:
        t: current tokens, protected ones included: an int, or ``[B]`` long (real tokens per
            sample of a padded batch).
        r: the config's ``r``.
        num_protected: ``p``.

    Returns:
        An int, or ``[B]`` long.
    """
    p = num_protected
    if isinstance(t, Tensor):
        free = (t - p).clamp(min=0)
        if r < 1:
            count = torch.where(t > MIN_TOKENS, (free * r).floor().long(), 0)  # t - r < 10 <=> t <= 10 here
        else:
            count = torch.minimum(torch.full_like(t, int(r)), t - MIN_TOKENS)
        return torch.minimum(count, free // 2).clamp(min=0)
    free = max(t - p, 0)
    count = (int(free * r) if t > MIN_TOKENS else 0) if r < 1 else min(int(r), t - MIN_TOKENS)
    return max(min(count, free // 2), 0)


def received_attention(attn: Tensor, valid: Tensor | None = None) -> Tensor:
    """The attention each token receives: the mean over heads and (real) queries.

    Args:
        attn: ``[B, H, N, N]`` probabilities.
        valid: ``[B, N]`` bool padding mask: padding queries are left out of the mean (so a
            sample gets what it gets alone); ``None`` when every token is real.

    Returns:
        ``[B, N]``, 0 on padding keys.
    """
    if valid is None:
        return attn.mean(dim=(1, 2))
    rows = valid.to(attn.dtype)[:, None, :, None]
    count = rows.sum(dim=(1, 2)).clamp_min(1) * attn.shape[1]  # a sample of only padding: 0, not NaN
    return (attn * rows).sum(dim=(1, 2)) / count


def _inverse_share(value: Tensor, valid: Tensor | None) -> Tensor:
    """``(1 / v) / max(1 / v)`` per sample over real tokens: ``[B, N]`` in ``(0, 1]``, 0 on padding."""
    inv = 1 / value
    if valid is not None:
        inv = inv.masked_fill(~valid, 0)
    return inv / inv.amax(dim=1, keepdim=True).clamp_min(torch.finfo(inv.dtype).tiny)


def attraction(
    metric: Tensor,
    received: Tensor | None,
    size: Tensor | None,
    tau_sim: float,
    tau_info: float,
    tau_size: float,
    num_protected: int = 0,
    valid: Tensor | None = None,
) -> Tensor:
    """MCTF's multi-criteria attraction of every A token to every B token.

    ``W = ((cos + 1) / 2)^(1/tau_sim) * (inf_i inf_j)^(1/tau_info) * (s_i s_j)^(1/tau_size)`` with
    ``inf = (1/a) / max(1/a)`` (``a``: attention received) and ``s = (1/size) / max(1/size)``; a
    criterion whose tau is 0 (or whose input is ``None``) is 1. Pairs with a protected or a padding
    token score ``-inf`` (A rows and B columns of the prefix: the class and distillation tokens
    never merge, whichever parity they have).

    Args:
        metric: ``[B, N, C]`` similarity features (MCTF: the residual stream itself).
        received: ``[B, N]`` attention received (`received_attention`), or ``None``.
        size: ``[B, N, 1]`` token sizes, or ``None`` before the first merge.
        tau_sim, tau_info, tau_size: temperatures in the official code's convention (exponent
            ``1 / tau``; 0 disables the criterion).
        num_protected: ``p``.
        valid: ``[B, N]`` bool padding mask, or ``None``.

    Returns:
        ``[B, Na, Nb]`` scores in float32 or wider.
    """
    dtype = torch.promote_types(metric.dtype, torch.float32)
    cos = bipartite_scores(metric.to(dtype), num_protected, valid)  # -inf on protected / padding pairs
    blocked = torch.isneginf(cos)
    if tau_sim:
        score = ((cos.masked_fill(blocked, 0) + 1) / 2) ** (1 / tau_sim)
    else:
        score = torch.ones_like(cos)
    if tau_info and received is not None:
        info = _inverse_share(received.to(dtype), valid)
        score = score * (info[:, ::2, None] * info[:, None, 1::2]) ** (1 / tau_info)
    if tau_size and size is not None:
        small = _inverse_share(size.squeeze(-1).to(dtype), valid)
        score = score * (small[:, ::2, None] * small[:, None, 1::2]) ** (1 / tau_size)
    return score.masked_fill(blocked, -math.inf)


def _inverse(order: Tensor) -> Tensor:
    """``[B, K]`` permutation -> ``[B, K]`` rank of every entry in it."""
    k = order.shape[1]
    return torch.empty_like(order).scatter_(1, order, torch.arange(k, device=order.device).expand_as(order))


def bidirectional_plan(
    score: Tensor,
    r1: int,
    r2: int,
    num_protected: int = 0,
    valid: Tensor | None = None,
    each: tuple[Tensor, Tensor] | None = None,
    num_out: int | None = None,
) -> Plan:
    """MCTF's two-step bipartite matching as one Plan from ``N`` to ``N - r1 - r2`` tokens.

    Step 1 (A -> B): the ``r1`` A tokens with the best attraction merge into their best B token.
    Step 2 (B -> A): on the same scores, restricted to the A tokens left, the ``r2`` B tokens with
    the best attraction merge into their best remaining A token (a B token that absorbed A tokens
    in step 1 brings them along: a chain A -> B -> A is one group). Ties go by position.

    Output order, as the official code's: the protected prefix in place, the A tokens left
    (ascending when ``p > 0``, by descending step-1 score when ``p == 0``), then the B tokens
    left by descending step-2 score (in position order when ``r2 == 0``: one-step matching).

    Args:
        score: ``[B, Na, Nb]`` from `attraction` (``-inf`` on protected / padding pairs).
        r1, r2: tokens merged in step 1 / step 2; with ``each``, the most any sample merges.
        num_protected: ``p``.
        valid: ``[B, N]`` bool padding mask (real tokens first), or ``None``.
        each: padded batches: ``([B], [B])`` long, the ``r1_i``, ``r2_i`` of every sample.
        num_out: padded batches: the plan's static slot count (at least every sample's count).

    Returns:
        A Plan (ragged, with ``valid``, for a padded batch).
    """
    bsz, n_a, n_b = score.shape
    n = n_a + n_b
    p = num_protected
    device = score.device
    with torch.no_grad():
        best1, partner1 = best_partner(score)
        order1 = rank_descending(best1)
        rank1 = _inverse(order1)
        r1_each = torch.full((bsz, 1), r1, device=device) if each is None else each[0].unsqueeze(1)
        merged_a = rank1 < r1_each  # [B, Na]
        score2 = score.masked_fill(merged_a.unsqueeze(-1), -math.inf).transpose(1, 2)  # [B, Nb, Na]
        best2, partner2 = best_partner(score2)  # partner2: an A index
        if r2:
            order2 = rank_descending(best2)
        else:  # one-step matching (ToMe's order): B in position order, the protected ones last as above
            b_index = torch.arange(n_b, device=device)
            order2 = torch.cat([b_index[p // 2 :], b_index[: p // 2]]).expand(bsz, n_b)
        r2_each = torch.full((bsz, 1), r2, device=device) if each is None else each[1].unsqueeze(1)
        merged_b = _inverse(order2) < r2_each  # [B, Nb]
        src = torch.cat([order1[:, :r1] * 2, order2[:, :r2] * 2 + 1], dim=1)
        if valid is None:
            return _fixed_plan(order1, order2, partner1, partner2, merged_b, r1, r2, p, n, src)
        if each is None:
            raise ValueError("a padded batch needs each sample's merge counts (each)")
        return _padded_plan(
            order1, order2, partner1, partner2, merged_a, merged_b, each, r1, r2, p, valid, src, num_out
        )


def _fixed_plan(
    order1: Tensor,
    order2: Tensor,
    partner1: Tensor,
    partner2: Tensor,
    merged_b: Tensor,
    r1: int,
    r2: int,
    p: int,
    n: int,
    src: Tensor,
) -> Plan:
    """`bidirectional_plan` without padding: static counts, the slots built directly."""
    bsz, n_a = order1.shape
    n_b = order2.shape[1]
    p_a, p_b = (p + 1) // 2, p // 2
    device = order1.device
    left_a = order1[:, r1:]
    if p:
        left_a = left_a.sort(dim=1).values[:, p_a:]  # the protected A tokens sort first: cut them
    left_b = order2[:, r2 : n_b - p_b]  # protected B rows score -inf: they rank last
    ka, kb = left_a.shape[1], left_b.shape[1]
    slot_a = torch.zeros(bsz, n_a, dtype=torch.long, device=device)
    slot_a[:, :p_a] = torch.arange(p_a, device=device) * 2  # prefix tokens keep their position
    slot_a.scatter_(1, left_a, torch.arange(p, p + ka, device=device).expand(bsz, ka))
    slot_b = torch.zeros(bsz, n_b, dtype=torch.long, device=device)
    slot_b[:, :p_b] = torch.arange(p_b, device=device) * 2 + 1
    slot_b.scatter_(1, left_b, torch.arange(p + ka, p + ka + kb, device=device).expand(bsz, kb))
    slot_b = torch.where(merged_b, slot_a.gather(1, partner2), slot_b)  # B tokens of step 2 end in A slots
    dst = torch.cat(
        [slot_b.gather(1, partner1.gather(1, order1[:, :r1])), slot_a.gather(1, partner2.gather(1, order2[:, :r2]))],
        dim=1,
    )
    keep = torch.cat([torch.arange(p, device=device).expand(bsz, p), left_a * 2, left_b * 2 + 1], dim=1)
    return Plan(keep=keep, src=src, src_dst=dst, num_in=n)


def _padded_plan(
    order1: Tensor,
    order2: Tensor,
    partner1: Tensor,
    partner2: Tensor,
    merged_a: Tensor,
    merged_b: Tensor,
    each: tuple[Tensor, Tensor],
    r1: int,
    r2: int,
    p: int,
    valid: Tensor,
    src: Tensor,
    num_out: int | None,
) -> Plan:
    """`bidirectional_plan` for a padded batch: per-sample counts, packed (`tmcore.plan.pack`)
    into candidate order: ``[prefix, A candidates, B by step-2 rank]``."""
    bsz, n_a = order1.shape
    n_b = order2.shape[1]
    n = valid.shape[1]
    p_a, p_b = (p + 1) // 2, p // 2
    device = order1.device
    real_a, real_b = valid[:, ::2].clone(), valid[:, 1::2].clone()
    real_a[:, :p_a], real_b[:, :p_b] = False, False  # prefix tokens are candidates of their own
    if p:  # A tokens left keep their positional order after the prefix ...
        a_cand = torch.arange(p_a, n_a, device=device).expand(bsz, n_a - p_a)
        cand_a = torch.cat([torch.arange(p_a, device=device) * 2, torch.arange(p, p + n_a - p_a, device=device)])
        cand_a = cand_a.expand(bsz, n_a)
    else:  # ... or come by descending step-1 score
        a_cand, cand_a = order1, _inverse(order1)
    b_index = torch.arange(n_b, device=device)
    cand_b = torch.where(b_index < p_b, b_index * 2 + 1, p + a_cand.shape[1] + _inverse(order2))
    cand_b = torch.where(merged_b, cand_a.gather(1, partner2), cand_b)  # step-2 merges end in A candidates
    kept = torch.cat(
        [valid[:, :p], (real_a & ~merged_a).gather(1, a_cand), (real_b & ~merged_b).gather(1, order2)], dim=1
    )
    candidates = torch.cat([torch.arange(p, device=device).expand(bsz, p), a_cand * 2, order2 * 2 + 1], dim=1)
    target1 = cand_b.gather(1, partner1.gather(1, order1[:, :r1]))
    target2 = cand_a.gather(1, partner2.gather(1, order2[:, :r2]))
    target = torch.cat(
        [
            torch.where(torch.arange(r1, device=device) < each[0].unsqueeze(1), target1, -1),
            torch.where(torch.arange(r2, device=device) < each[1].unsqueeze(1), target2, -1),
        ],
        dim=1,
    )
    # a sample that merges nothing stays as it is (the official code returns it untouched)
    still = ((each[0] + each[1]) == 0).unsqueeze(1)
    candidates = torch.where(still, torch.arange(n, device=device).expand(bsz, n), candidates)
    kept = torch.where(still, valid, kept)
    return pack(candidates, kept, n, src, target, num_out=num_out)


def merged_attention(attn: Tensor, plan: Plan, size: Tensor | None, amax: bool = False) -> Tensor:
    """One-step-ahead attention: the probabilities of the ``N`` tokens a block was entered with,
    brought to the ``M`` tokens ``plan`` leaves, as the attention of those tokens.

    Keys: each group's probabilities are summed (rows still sum to 1). Queries: each group's rows
    are pooled as its features are (`tmcore.plan.merge_tokens`: the plan's weight, else sizes),
    or by their maximum with ``amax``. Padding slots of a ragged plan get no attention.

    Args:
        attn: ``[B, H, N, N]`` probabilities (gradients flow through).
        plan: the block's Plan, with the features' merge weight.
        size: ``[B, N, 1]`` sizes before the merge (the weights of a plan without one), or ``None``.
        amax: pool queries by their maximum (MCTF's max pooling).

    Returns:
        ``[B, H, M, M]``.
    """
    b, h, n, _ = attn.shape
    m = plan.num_out
    keys = reduce(attn.reshape(b, h * n, n).transpose(1, 2), plan, "sum")  # [B, M keys, H N queries]
    queries = keys.reshape(b, m, h, n).permute(0, 3, 2, 1).reshape(b, n, h * m)  # [B, N queries, H M keys]
    pooled = reduce(queries, plan, "amax") if amax else merge_tokens(queries, plan, size)[0]
    out = pooled.reshape(b, m, h, m).permute(0, 2, 1, 3)
    if plan.valid is not None:
        out = out.masked_fill(~plan.valid[:, None, None, :], 0)
    return out
