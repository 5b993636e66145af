"""ToMe for Stable Diffusion's partition and matching (tomesd 0.1.3, ``bipartite_soft_matching_random2d``)
as pure tensor functions that build a `tmcore.Plan`; tmcore merges with it and unmerges after
each sub-layer (block scope)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from tmcore import Plan
from tmcore.matching import best_partner, rank_descending

__all__ = ["stride_partition", "random2d_plan"]


def stride_partition(h: int, w: int, sx: int, sy: int, choice: Tensor | None, device: torch.device) -> Tensor:
    """The destination / source split of an ``h x w`` token grid: one destination in every full
    ``sy x sx`` cell, every other token a source (border rows and columns that fill no cell too).

    Args:
        h, w: the grid, row-major (``N = h * w`` tokens).
        sx, sy: cell width and height.
        choice: ``[h // sy, w // sx]`` long in ``[0, sy * sx)``, the destination's position inside
            each cell (row-major within the cell); ``None``: the top-left one.
        device: where the indices go.

    Returns:
        ``[N]`` long: the ``(h // sy) * (w // sx)`` destination tokens first, then the sources. The
        order inside each set is that of ``argsort`` over a ``-1 / 0`` mark, as tomesd sorts it
        (the backend's order for equal keys; tomesd's outputs do not depend on it beyond ties).
    """
    hs, ws = h // sy, w // sx
    if choice is None:
        choice = torch.zeros(hs, ws, dtype=torch.long, device=device)
    mark = torch.zeros(hs, ws, sy * sx, dtype=torch.long, device=device)
    mark.scatter_(2, choice.unsqueeze(-1), -1)
    mark = mark.view(hs, ws, sy, sx).transpose(1, 2).reshape(hs * sy, ws * sx)
    mark = F.pad(mark, (0, w - ws * sx, 0, h - hs * sy))  # border remainders: sources
    return mark.reshape(1, -1, 1).argsort(dim=1).view(-1)


def random2d_plan(metric: Tensor, order: Tensor, num_dst: int, r: int) -> Plan:
    """Bipartite soft matching between a grid's sources and destinations (`stride_partition`):
    every source's most similar destination by cosine, the ``r`` sources with the best matches
    merge into theirs.

    Args:
        metric: ``[B, N, C]`` similarity features (tomesd: the block's input).
        order: ``[N]`` long, destinations first (`stride_partition`), shared by the batch.
        num_dst: how many of ``order`` are destinations.
        r: sources to merge, ``0 < r <= N - num_dst``.

    Returns:
        A Plan from ``N`` to ``N - r`` tokens, in tomesd's output order: the unmerged sources by
        descending match score, then the destinations in ``order``.
    """
    b, n, _ = metric.shape
    dst, src = order[:num_dst], order[num_dst:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric.index_select(1, src) @ metric.index_select(1, dst).transpose(-1, -2)
    best, partner = best_partner(scores)  # [B, Ns]
    ranked = rank_descending(best)
    merged, unmerged = ranked[:, :r], ranked[:, r:]
    keep = torch.cat([src[unmerged], dst.expand(b, num_dst)], dim=1)
    return Plan(keep=keep, src=src[merged], src_dst=partner.gather(1, merged) + unmerged.shape[1], num_in=n)
