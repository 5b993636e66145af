"""DiffRate's tensor pieces (Chen et al., ICCV 2023): the class-attention order, the band merge
plan of the inference block, and the differentiable kept counts of the search.

Pure functions of tensors; the reducer (`tm_diffrate.reducer`) composes them. Shapes: ``B``
batch, ``N`` tokens, ``p`` protected prefix (class token, distillation token), ``C`` channels,
``K`` candidate counts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tmcore.matching import best_partner, rank_key
from tmcore.plan import Plan, pack

__all__ = [
    "class_importance",
    "importance_order",
    "band_plan",
    "candidates",
    "ste_ceil",
    "ste_min",
    "expected_kept",
    "keep_probability",
]


def class_importance(cls_attn: Tensor, num_protected: int) -> Tensor:
    """The attention the class token pays each unprotected token, averaged over heads.

    Args:
        cls_attn: ``[B, H, N]`` the class token's attention row (its ``log(size)`` bias included).
        num_protected: ``p``.

    Returns:
        ``[B, N - p]``, in float32 or wider.
    """
    row = cls_attn[:, :, num_protected:]
    return row.to(torch.promote_types(row.dtype, torch.float32)).mean(dim=1)


def importance_order(importance: Tensor, num_protected: int, last: Tensor | None = None) -> Tensor:
    """DiffRate's token order: the protected prefix in place, then the other tokens by descending
    class attention; equal scores by position (`rank_key`, stable sort).

    Args:
        importance: ``[B, N - p]`` from `class_importance`.
        num_protected: ``p``.
        last: ``[B, N - p]`` bool, tokens sorted behind all others whatever their score (padding,
            tokens a soft mask has switched off), in their current order; ``None``: none.

    Returns:
        ``[B, N]`` long, input positions in output order.
    """
    b = importance.shape[0]
    key = rank_key(importance)
    if last is not None:
        key = key.masked_fill(last, -math.inf)
    order = key.argsort(dim=-1, descending=True, stable=True) + num_protected
    prefix = torch.arange(num_protected, device=importance.device).expand(b, num_protected)
    return torch.cat([prefix, order], dim=1)


def band_plan(
    order: Tensor,
    tokens: Tensor,
    prune_kept: int,
    merge_kept: int,
    num_protected: int,
    valid: Tensor | None = None,
) -> Plan:
    """The official inference block as a Plan: keep ranks ``[0, n2)`` of ``order``, merge ranks
    ``[n2, n1)`` into their most similar of ranks ``[p, n2)`` (cosine of ``tokens``; the prefix is
    never a destination), drop the rest. ``n1 = min(N, prune_kept)``, ``n2 = min(n1, merge_kept)``
    (the running minimum). Groups average without weights (destination included) and a merged
    token adds ``size * similarity`` to its destination's size (``Plan.with_size_scale``).

    Args:
        order: ``[B, N]`` long from `importance_order` (padding last).
        tokens: ``[B, N, C]`` post-attention tokens (the similarity metric).
        prune_kept, merge_kept: the block's kept counts, prefix included, ``> p``.
        num_protected: ``p``.
        valid: ``[B, N]`` bool padding mask; sample ``i`` with ``T_i`` real tokens then uses
            ``n1_i = min(T_i, prune_kept)`` and ``n2_i = min(n1_i, merge_kept)``, as alone.

    Returns:
        A Plan of ``min(N, prune_kept, merge_kept)`` slots (ragged with ``valid``), equal merge
        weights and the similarity size scale; output order ``[prefix, ranks 1.. by descending
        class attention]``.
    """
    b, n, _ = tokens.shape
    p = num_protected
    m1 = min(n, prune_kept)
    m2 = min(m1, merge_kept)
    if valid is None and m2 == m1:  # nothing merges: a pure prune (or re-order)
        return Plan.prune(order[:, :m1], n)
    with torch.no_grad():
        unit = tokens / tokens.norm(dim=-1, keepdim=True)
        ranked = unit.gather(1, order[:, :m1, None].expand(-1, -1, unit.shape[-1]))  # [B, m1, C]
        sim = ranked @ ranked[:, :m2].transpose(-1, -2)  # [B, m1, m2]: every candidate vs the heads
        rank = torch.arange(m2, device=tokens.device)
        blocked = rank < p  # [m2]: the prefix is never a destination
        if valid is None:
            best, dst = best_partner(sim[:, m2:].masked_fill(blocked, -math.inf))  # [B, m1 - m2]
            scale = torch.ones(b, n, 1, dtype=best.dtype, device=tokens.device)
            scale.scatter_(1, order[:, m2:m1, None], best.unsqueeze(-1))
            plan = Plan(keep=order[:, :m2], src=order[:, m2:m1], src_dst=dst, num_in=n)
            return plan.with_equal_weights().with_size_scale(scale)
        total = valid.sum(1, keepdim=True)  # [B, 1] real tokens, prefix included
        n1 = total.clamp(max=prune_kept)
        n2 = n1.clamp(max=merge_kept)
        heads = ~blocked & (rank < n2)  # [B, m2]: each sample's destinations
        best, dst = best_partner(sim.masked_fill(~heads.unsqueeze(1), -math.inf))  # [B, m1]
        ranks = torch.arange(m1, device=tokens.device)
        merges = (ranks >= n2) & (ranks < n1)  # [B, m1]
        kept = torch.arange(n, device=tokens.device) < n2  # [B, N] over ranks
        scale = torch.ones(b, n, 1, dtype=best.dtype, device=tokens.device)
        scale.scatter_(1, order[:, :m1, None], torch.where(merges, best, 1.0).unsqueeze(-1))
        plan = pack(order, kept, n, order[:, :m1], torch.where(merges, dst, -1), num_out=m2)
    return plan.with_equal_weights().with_size_scale(scale)


# -- the search: differentiable kept counts ---------------------------------------------------


def candidates(patches: int, granularity: int) -> Tensor:
    """``[K]`` float: the candidate kept counts ``patches, patches - g, ...`` down to at least 1
    (prefix excluded)."""
    return torch.arange(patches, 0, -granularity, dtype=torch.float32)


def ste_ceil(x: Tensor) -> Tensor:
    """``ceil(x)`` forward, identity backward (straight-through)."""
    return x + (torch.ceil(x) - x).detach()


def ste_min(n: Tensor, prune_kept: Tensor, merge_kept: Tensor) -> Tensor:
    """``min(n, prune_kept, merge_kept)`` forward; backward passes the incoming gradient to both
    kept counts unchanged and none to ``n`` (the official FLOP model's rule)."""
    value = torch.minimum(n.detach(), torch.minimum(prune_kept, merge_kept)).detach()
    return value + (prune_kept - prune_kept.detach()) + (merge_kept - merge_kept.detach())


def expected_kept(logits: Tensor, cands: Tensor, num_protected: int) -> Tensor:
    """The differentiable kept count of one block: ``ceil_STE(sum_k cand_k softmax(logits)_k) + p``.

    Args:
        logits: ``[K]`` learnable logits; cands: ``[K]`` from `candidates`.

    Returns:
        A 0-dim tensor whose value is an integer, with gradients to ``logits``.
    """
    return ste_ceil(cands.to(logits) @ logits.softmax(dim=-1)) + num_protected


def keep_probability(logits: Tensor, cands: Tensor, num_protected: int, length: int) -> Tensor:
    """``[length]``: the probability that rank ``j`` survives, ``sum_k softmax(logits)_k
    [cand_k + p > j]`` (1 on the prefix); the gradient path of the soft masks."""
    ranks = torch.arange(length, device=logits.device, dtype=logits.dtype)
    alive = (cands.to(logits).unsqueeze(0) + num_protected > ranks.unsqueeze(1)).to(logits.dtype)  # [length, K]
    return alive @ logits.softmax(dim=-1)
