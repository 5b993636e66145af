"""Decision primitives shared by reducers: ToMe's bipartite soft matching, and keeping the
highest-scoring tokens (the pruning half of PPT, EViT-style top-k)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tmcore.plan import Plan

__all__ = ["bipartite_soft_matching", "max_bipartite_r", "prune_lowest"]


def max_bipartite_r(num_tokens: int, num_protected: int) -> int:
    """The most tokens one bipartite matching can remove: half of the unprotected tokens."""
    return max(num_tokens - num_protected, 0) // 2


def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int = 0) -> Plan:
    """ToMe's bipartite soft matching (ALGORITHMS 1.3) with ``p`` protected prefix tokens.

    Tokens split by position parity into A (even) and B (odd); every A token finds its most
    similar B token (cosine); the ``r`` A tokens with the best matches merge into their partner.
    Protected prefix tokens (class, distillation, register tokens) are never a source (their A
    rows are ``-inf``) nor a destination (their B columns are ``-inf``). For ``p = 1`` and
    ``p = 2`` this is exactly the original's class / distillation-token handling.

    Output order, as in the original: ``[protected prefix, unmerged A, B]``. Unmerged A tokens
    keep their relative order when ``p > 0`` and come in descending-score order when ``p == 0``.

    Args:
        metric: ``[B, N, d]`` similarity features (head-mean keys for ToMe).
        r: tokens to remove, ``0 <= r <= max_bipartite_r(N, p)``; callers clamp and warn.
        num_protected: ``p``, the length of the protected prefix.

    Returns:
        A Plan from ``N`` to ``N - r`` tokens.
    """
    b, n, _ = metric.shape
    p = num_protected
    if not 0 <= r <= max_bipartite_r(n, p):
        raise ValueError(f"r={r} is outside [0, {max_bipartite_r(n, p)}] for {n} tokens, {p} protected")
    device = metric.device
    if r == 0:
        return Plan.prune(torch.arange(n, device=device).expand(b, n), n)
    n_a, n_b = (n + 1) // 2, n // 2
    p_a, p_b = (p + 1) // 2, p // 2  # protected tokens that fall in A / in B

    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)  # [B, n_a, n_b]
        if p_a:
            scores[:, :p_a, :] = -math.inf
        if p_b:
            scores[:, :, :p_b] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # [B, n_a]
        order = node_max.argsort(dim=-1, descending=True, stable=True)
        src_a = order[:, :r]  # A indices that merge away
        unm_a = order[:, r:]
        if p:
            unm_a = unm_a.sort(dim=-1).values  # protected A tokens first, then original order
        unm_a = unm_a[:, p_a:]
        dst_b = node_idx.gather(1, src_a)  # B index of each source's partner

        n_unm = n_a - p_a - r
        keep = torch.cat(
            [
                torch.arange(p, device=device).expand(b, p),
                unm_a * 2,
                (torch.arange(p_b, n_b, device=device) * 2 + 1).expand(b, n_b - p_b),
            ],
            dim=1,
        )
        src_dst = dst_b - p_b + p + n_unm  # B token j sits in slot p + n_unm + (j - p_b)
    return Plan(keep=keep, src=src_a * 2, src_dst=src_dst, num_in=n)


def prune_lowest(score: Tensor, r: int, num_protected: int = 0) -> Plan:
    """Drop the ``r`` lowest-scoring unprotected tokens of every sample.

    Output order: the protected prefix in place, then the kept tokens by descending score (the
    order PPT's pruning and EViT's top-k produce); equal scores keep their positional order.

    Args:
        score: ``[B, N]`` per-token score (e.g. class attention); the prefix's entries are ignored.
        r: tokens to drop, ``0 <= r <= N - num_protected``.
        num_protected: ``p``, the length of the protected prefix.

    Returns:
        A Plan from ``N`` to ``N - r`` tokens that lists the dropped tokens (``src`` with
        ``src_dst = -1``), so it has the shapes of `bipartite_soft_matching`'s plan for the
        same ``r`` and `tmcore.plan.select` can mix the two per sample.
    """
    b, n = score.shape
    p = num_protected
    if not 0 <= r <= n - p:
        raise ValueError(f"r={r} is outside [0, {n - p}] for {n} tokens, {p} protected")
    with torch.no_grad():
        order = score[:, p:].argsort(dim=-1, descending=True, stable=True) + p
    prefix = torch.arange(p, device=score.device).expand(b, p)
    return Plan.prune(torch.cat([prefix, order[:, : n - p - r]], dim=1), n, drop=order[:, n - p - r :])
