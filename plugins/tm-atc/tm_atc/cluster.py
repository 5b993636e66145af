"""Agglomerative (bottom-up) clustering of tokens, batched over samples, on the tokens' device.

Classic hierarchical clustering: every token starts as its own cluster; each step merges the two
closest clusters and updates the distances of the merged cluster to all others with the
Lance-Williams formula of the linkage (``single``: minimum over member pairs, ``complete``:
maximum, ``average``: mean over all member pairs, UPGMA); stop at ``K`` clusters. Cutting the
dendrogram at ``K`` clusters, as ``sklearn.cluster.AgglomerativeClustering(n_clusters=K,
metric="precomputed", linkage=...)`` does, gives the same partition.

The number of steps is a Python int known from shapes, so the loop runs over merge *steps*; each
step is one batched argmin over ``[B, T, T]`` and ``O(B T)`` updates: no loop over samples or
tokens, no host synchronisation. A padded batch gives each sample its own number of steps
(``each``); a sample past its count leaves its matrix alone.

Conventions, for results that do not depend on the batch or its padding:

- a merged cluster keeps the lower of its two indices, so every cluster is named by its smallest
  member position (its *representative*);
- ties go by position (`tmcore.matching.rank_key`): the closest pair with the smallest first
  index, then the smallest second index;
- ``+inf`` distances never merge (the diagonal, padding, dead clusters).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from tmcore.matching import rank_key
from tmcore.plan import Plan, pack

__all__ = [
    "Linkage",
    "LINKAGES",
    "cosine_distances",
    "position_ties",
    "closest_pairs",
    "lance_williams",
    "agglomerate",
    "representatives",
    "cluster_plan",
    "padded_cluster_plan",
]

Linkage = Literal["average", "complete", "single"]
LINKAGES: tuple[str, ...] = ("average", "complete", "single")


def cosine_distances(metric: Tensor, valid: Tensor | None = None) -> Tensor:
    """``1 - cos`` between every pair of tokens, ``+inf`` on the diagonal and for padding.

    Args:
        metric: ``[B, T, d]`` token features (head-mean keys).
        valid: ``[B, T]`` bool, ``False`` on padding; ``None``: every token is real.

    Returns:
        ``[B, T, T]`` symmetric, in float32 at least (float64 for float64 features): half
        precision would round most of the distances between similar tokens to the same value.
    """
    metric = metric.to(torch.promote_types(metric.dtype, torch.float32))
    # clamp: a zero key (padding of some models) would give NaN, which argmin cannot order
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)
    dist = 1 - unit @ unit.transpose(-1, -2)
    t = metric.shape[1]
    # exactly symmetric (a matmul need not be): the upper triangle, as scikit-learn reads it
    upper = torch.ones(t, t, dtype=torch.bool, device=metric.device).triu(1)
    dist = torch.where(upper, dist, dist.transpose(-1, -2))
    blocked = torch.eye(t, dtype=torch.bool, device=metric.device)
    if valid is not None:
        blocked = blocked | ~(valid.unsqueeze(2) & valid.unsqueeze(1))
    return dist.masked_fill(blocked, torch.inf)


def position_ties(dist: Tensor) -> Tensor:
    """``[T]`` what `closest_pairs` adds to distances to compare them: ``TIE_STEP`` per position
    for float64 (`tmcore.matching.rank_key`, ascending), zeros for other dtypes."""
    return rank_key(dist.new_zeros(dist.shape[-1]), descending=False)


def closest_pairs(dist: Tensor, ties: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The closest pair of clusters of every sample.

    Args:
        dist: ``[B, T, T]`` symmetric cluster distances, ``+inf`` where a pair may not merge.
        ties: ``[T]`` `position_ties` (computed here when not given).

    Returns:
        ``([B] i, [B] j)`` long with ``i < j`` where a finite pair exists; ties go to the smallest
        ``i``, then the smallest ``j`` (float64 distances a rounding error apart count as tied).
        A sample with no finite pair gets ``(0, 0)``.
    """
    ties = position_ties(dist) if ties is None else ties
    # the closest row by its minimum, then the closest column in that row: each arg-min shifts
    # ties by one position index, so the order does not depend on T (on the padding); a min over
    # the matrix is also several times faster than an arg-min over it on CPUs
    row = (dist.amin(dim=-1) + ties).argmin(dim=-1)  # [B]
    d_row = dist.gather(1, row.view(-1, 1, 1).expand(-1, 1, dist.shape[2])).squeeze(1)  # [B, T]
    partner = (d_row + ties).argmin(dim=-1)
    return torch.minimum(row, partner), torch.maximum(row, partner)


def lance_williams(d_i: Tensor, d_j: Tensor, n_i: Tensor, n_j: Tensor, linkage: Linkage) -> Tensor:
    """Distances of the union of clusters ``i`` and ``j`` to every cluster ``k``.

    Args:
        d_i, d_j: ``[B, T]`` distances of ``i`` and of ``j`` to every cluster.
        n_i, n_j: ``[B, 1]`` member counts of ``i`` and ``j`` (tokens, not token sizes: each
            token is one point, as for sklearn).
        linkage: ``single`` (min), ``complete`` (max) or ``average`` (size-weighted mean).

    Returns:
        ``[B, T]``; ``+inf`` where both inputs are ``+inf``.
    """
    if linkage == "single":
        return torch.minimum(d_i, d_j)
    if linkage == "complete":
        return torch.maximum(d_i, d_j)
    # (n_i d_ik + n_j d_jk) / (n_i + n_j); inf stays inf (both are inf together)
    return (n_i * d_i + n_j * d_j) / (n_i + n_j)


def agglomerate(dist: Tensor, steps: int, linkage: Linkage, each: Tensor | None = None) -> Tensor:
    """Bottom-up clustering of every sample's tokens by ``steps`` merges of the closest pair.

    Args:
        dist: ``[B, T, T]`` symmetric token distances; the diagonal is ignored, ``+inf`` pairs
            never merge (padding). Not modified.
        steps: merges to run, ``0 <= steps < T`` (``T - K`` for ``K`` clusters).
        linkage: ``average``, ``complete`` or ``single``.
        each: ``[B]`` long, merges of each sample (``<= steps``), for padded batches; ``None``:
            ``steps`` for every sample.

    Returns:
        ``[B, T]`` long, each token's representative: the smallest position in its cluster
        (padding tokens are their own). A sample with ``T_i`` real tokens and ``s_i`` merges
        has ``T_i - s_i`` clusters of real tokens.
    """
    b, t, _ = dist.shape
    eye = torch.eye(t, dtype=torch.bool, device=dist.device)
    dist = dist.masked_fill(eye, torch.inf)  # a copy, updated in place below
    ties = position_ties(dist)
    members = torch.ones(b, t, dtype=dist.dtype, device=dist.device)
    label = torch.arange(t, device=dist.device).expand(b, t).clone()
    dead = dist.new_full((b, 1, t), torch.inf)
    no_members = members.new_zeros(b, 1)
    for step in range(steps):
        i, j = closest_pairs(dist, ties)
        pair = torch.stack([i, j], dim=1)  # [B, 2]
        rows = pair.unsqueeze(2).expand(b, 2, t)
        d = dist.gather(1, rows)  # [B, 2, T] the distances of i and of j
        n = members.gather(1, pair)  # [B, 2]
        union = lance_williams(d[:, 0], d[:, 1], n[:, :1], n[:, 1:], linkage).scatter(1, pair, torch.inf)
        # i's row and column take the union's distances, j's die (+inf): the matrix stays symmetric
        new_d = torch.cat([union.unsqueeze(1), dead], dim=1)
        new_n = torch.cat([n.sum(dim=1, keepdim=True), no_members], dim=1)
        joins = label == j.unsqueeze(1)
        if each is not None:  # a sample past its own count writes back what it has
            active = (step < each).unsqueeze(1)
            new_d = torch.where(active.unsqueeze(2), new_d, d)
            new_n = torch.where(active, new_n, n)
            joins = joins & active
        dist.scatter_(1, rows, new_d).scatter_(2, rows.transpose(1, 2), new_d.transpose(1, 2))
        members.scatter_(1, pair, new_n)
        label = torch.where(joins, i.unsqueeze(1), label)
    return label


def representatives(label: Tensor) -> Tensor:
    """``[B, T]`` bool: the tokens that name their cluster (`agglomerate`'s labels)."""
    return label == torch.arange(label.shape[1], device=label.device)


def cluster_plan(label: Tensor, num_clusters: int, num_protected: int) -> Plan:
    """The Plan of a clustering of the unprotected tokens, every sample with ``K`` clusters.

    Output order: the protected prefix in place, then the clusters by their smallest token
    position. Each cluster's slot is seeded by that token; its other members are ``src`` entries
    that join the slot (size-weighted mean, sizes summed: `tmcore.plan.merge_tokens`).

    Args:
        label: ``[B, T]`` long, each unprotected token's representative (`agglomerate`),
            exactly ``num_clusters`` representatives per sample.
        num_clusters: ``K``, ``1 <= K <= T``.
        num_protected: ``p``; token ``t`` of ``label`` is input token ``p + t``.

    Returns:
        A Plan from ``p + T`` to ``p + K`` tokens.
    """
    b, t = label.shape
    p, k = num_protected, num_clusters
    device = label.device
    rep = representatives(label)
    positions = torch.arange(t, device=device).expand(b, t)
    slot = rep.cumsum(1) - 1  # [B, T] a representative's cluster slot (after the prefix)
    # representatives to the first K columns, other members to the rest, both in position order;
    # the spare column K (or T - K) takes the writes of the other kind and is cut off
    seeds = label.new_zeros(b, k + 1).scatter_(1, torch.where(rep, slot, k), positions)[:, :k]
    rest = (~rep).cumsum(1) - 1
    src = label.new_zeros(b, t - k + 1).scatter_(1, torch.where(rep, t - k, rest), positions)[:, : t - k]
    src_dst = p + slot.gather(1, label.gather(1, src))
    prefix = torch.arange(p, device=device).expand(b, p)
    return Plan(keep=torch.cat([prefix, seeds + p], dim=1), src=src + p, src_dst=src_dst, num_in=p + t)


def padded_cluster_plan(label: Tensor, valid: Tensor, num_protected: int, num_out: int) -> Plan:
    """`cluster_plan` for a padded batch: each sample's prefix and clusters first, in the order
    it has alone, then padding slots.

    Args:
        label: ``[B, T]`` long representatives of the unprotected tokens (`agglomerate` with
            padding at ``+inf``, so padding tokens are their own).
        valid: ``[B, p + T]`` bool padding mask of the input tokens (real tokens first).
        num_protected: ``p``.
        num_out: ``M``, the static slot count, at least every sample's ``p + K_i``.

    Returns:
        A ragged Plan (``Plan.valid``) from ``p + T`` to ``M`` tokens (no host synchronisation).
    """
    b, t = label.shape
    p = num_protected
    n = p + t
    real = valid[:, p:]
    rep = representatives(label)
    # candidates in position order: the prefix, then each real representative
    kept = torch.cat([valid[:, :p], rep & real], dim=1)
    src = torch.arange(p, n, device=label.device).expand(b, t)
    target = torch.where(real & ~rep, label + p, -1)  # candidate index = input position
    return pack(torch.arange(n, device=label.device), kept, n, src, target, num_out=num_out)
