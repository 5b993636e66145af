"""The group painting behind ``tmcore visualize``: one colour per group, pruned patches black."""

from __future__ import annotations

import torch

from tmcore.visualize import PRUNED, group_map, palette, render_groups


def test_group_map_numbers_groups_and_marks_pruned_patches():
    # 1 protected token, 2 x 3 patches; slot 2 holds three patches, patch 4 was pruned
    source = torch.tensor([0, 2, 5, 2, -1, 2, 3])
    groups = group_map(source, 1, (2, 3))
    assert groups.tolist() == [[0, 2, 0], [-1, 0, 1]]


def test_flat_rendering_has_one_colour_per_group_and_black_for_pruned():
    groups = torch.tensor([[0, 2, 0], [-1, 0, 1]])
    png = render_groups(groups, scale=4)
    assert png.size == (12, 8)
    colours = {c for _, c in png.getcolors()}
    assert colours == set(palette(3)) | {PRUNED}
    assert png.getpixel((1, 5)) == PRUNED  # the pruned patch (row 1, column 0)
    assert len(set(palette(50))) == 50 and PRUNED not in palette(50)


def test_mean_rendering_fills_groups_with_their_mean_colour_and_outlines_them():
    groups = torch.tensor([[0, 0], [1, -1]])
    image = torch.zeros(3, 4, 4)  # patch size 2
    image[:, :2, :2] = 0.2
    image[:, :2, 2:] = 0.6  # group 0: mean 0.4
    image[:, 2:, :2] = 1.0  # group 1
    png = render_groups(groups, scale=8, image=image)
    grey = round(0.4 * 255)
    assert png.getpixel((4, 4)) == (grey, grey, grey)  # inside group 0
    assert png.getpixel((4, 12)) == (255, 255, 255)  # inside group 1
    assert png.getpixel((12, 12)) == PRUNED
    assert png.getpixel((4, 7)) == palette(2)[0]  # group 0's outline towards group 1
    assert png.getpixel((4, 8)) == palette(2)[1]
