"""Paint which input patches each output token stands for (as in the ToMe / PiToMe papers)."""

from __future__ import annotations

import colorsys
from typing import Any

import torch
from torch import Tensor

__all__ = ["PRUNED", "group_map", "palette", "render_groups"]

PRUNED = (0, 0, 0)
"""Colour of patches whose token was pruned (no output token stands for them)."""


def group_map(source: Tensor, num_protected: int, grid: tuple[int, int]) -> Tensor:
    """``[N0]`` source map of one image -> ``[H, W]`` group id per patch (``0..G-1`` in order of
    output slot; ``-1`` where the patch's token was pruned)."""
    slots = source[num_protected:]
    ids = torch.full_like(slots, -1)
    kept = slots >= 0
    _, inverse = torch.unique(slots[kept], return_inverse=True)
    ids[kept] = inverse
    return ids.view(*grid)


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct, non-black colours (evenly spaced hues at two brightness levels)."""
    colours: list[tuple[int, int, int]] = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbouring groups apart
        value = 0.95 if i % 2 == 0 else 0.7
        rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, 0.75, value))
        while rgb in colours or rgb == PRUNED:
            rgb = ((rgb[0] + 1) % 256, rgb[1], rgb[2])
        colours.append(rgb)  # type: ignore[arg-type]
    return colours


def _group_means(groups: Tensor, image: Tensor) -> Tensor:
    """Mean colour of each group's pixels: ``[H, W]`` ids, ``[3, H*p, W*p]`` -> ``[G, 3]``."""
    n = int(groups.max()) + 1
    ph, pw = image.shape[1] // groups.shape[0], image.shape[2] // groups.shape[1]
    pixel_groups = groups.repeat_interleave(ph, 0).repeat_interleave(pw, 1).flatten()
    kept = pixel_groups >= 0
    pixels = image.flatten(1).T[kept].double()  # [P, 3]
    sums = torch.zeros(n, 3, dtype=torch.float64).index_add_(0, pixel_groups[kept], pixels)
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, pixel_groups[kept], torch.ones(len(pixels)).double())
    return sums / counts.unsqueeze(1)


def render_groups(groups: Tensor, scale: int, image: Tensor | None = None) -> Any:
    """``[H, W]`` group ids -> a PIL RGB image, each patch ``scale x scale`` pixels.

    Without ``image``: one flat, distinct colour per group, so the PNG has exactly as many colours
    as groups (plus black where patches were pruned). With ``image`` (``[3, H*p, W*p]`` in
    ``[0, 1]``, the model's input): ToMe's figure style, each group filled with the mean colour of
    its input pixels and outlined in its own palette colour; pruned patches black.
    """
    from PIL import Image

    n = int(groups.max()) + 1 if (groups >= 0).any() else 0
    table = torch.tensor([*palette(n), PRUNED], dtype=torch.uint8)
    ids = torch.where(groups < 0, n, groups).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    rgb = table[ids]  # [H*scale, W*scale, 3]
    if image is not None and n:
        fill = torch.cat([(_group_means(groups, image) * 255).round().clamp(0, 255).to(torch.uint8), table[-1:]])
        # a pixel is on its group's outline where a 4-neighbour belongs to another group
        edge = torch.zeros(ids.shape, dtype=torch.bool)
        horizontal, vertical = ids[:, :-1] != ids[:, 1:], ids[:-1, :] != ids[1:, :]
        edge[:, :-1] |= horizontal
        edge[:, 1:] |= horizontal
        edge[:-1, :] |= vertical
        edge[1:, :] |= vertical
        rgb = torch.where(edge.unsqueeze(-1) & (ids < n).unsqueeze(-1), rgb, fill[ids])
    return Image.fromarray(rgb.numpy(), mode="RGB")
