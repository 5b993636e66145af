"""DiffRate's inference against a reference written in the official evaluation block's structure
(``DiffRateBlock.forward`` in eval mode, github.com/OpenGVLab/DiffRate): explicit softmax with
``log(size)``, an argsort of the class attention, slices, a scatter mean and the similarity-scaled
size update. tmcore runs the same tiny float64 timm ViT through its adapter and must agree to 1e-9;
two plausible misreadings of the block must not."""

from __future__ import annotations

import math

import pytest
import torch

import tmcore
from tmcore.testing.reference import float64_timm, vit_forward

PRUNE = [65, 60, 52, 40]
MERGE = [62, 50, 44, 24]


def official_block(prune, merge, variant="official"):
    """``reduce(layer, x, size, keys, attn, values)`` for `vit_forward`: one block's reduction."""

    def reduce(layer, x, size, keys, attn, values):
        b, _, c = x.shape
        if size is None:
            size = torch.ones_like(x[..., :1])
        cls_attn = attn[:, :, 0, 1:].mean(dim=1)
        idx = torch.argsort(cls_attn, dim=1, descending=True, stable=True)  # stable: tmcore's tie rule
        idx = torch.cat([torch.zeros(b, 1, dtype=torch.long), idx + 1], dim=1)
        x = x.gather(1, idx[..., None].expand(-1, -1, c))
        size = size.gather(1, idx[..., None])
        x, size = x[:, : prune[layer]], size[:, : prune[layer]]
        kept = merge[layer]
        if kept < x.shape[1]:
            metric = x / x.norm(dim=-1, keepdim=True)
            sim = metric[:, kept:] @ metric[:, :kept].transpose(-1, -2)
            sim[..., :, 0] = -math.inf
            node_max, node_idx = sim.max(dim=-1)
            to = node_idx[..., None]
            src_x, src_s = x[:, kept:], size[:, kept:]
            if variant == "size-weighted mean":
                total = (x[:, :kept] * size[:, :kept]).scatter_reduce(
                    1, to.expand(-1, -1, c), src_x * src_s, reduce="sum"
                )
                weight = size[:, :kept].scatter_reduce(1, to, src_s, reduce="sum")
                x = total / weight
            else:
                x = x[:, :kept].scatter_reduce(1, to.expand(-1, -1, c), src_x, reduce="mean")
            moved = src_s if variant == "sizes summed" else src_s * node_max[..., None]
            size = size[:, :kept].scatter_reduce(1, to, moved, reduce="sum")
        return x, size

    return reduce


@pytest.fixture(scope="module")
def vit():
    model, images = float64_timm("vit_tiny_patch16_224", batch=3, img_size=32, patch_size=4, depth=4, embed_dim=48)
    return model, images


def reference(model, images, variant="official"):
    with torch.no_grad():
        tokens, _ = vit_forward(model, images, official_block(PRUNE, MERGE, variant), prop_attn=True, attention=True)
    return tokens


def test_matches_the_official_block(vit):
    model, images = vit
    ref = reference(model, images)
    tmcore.apply(model, "diffrate", prune=PRUNE, merge=MERGE)
    try:
        with torch.no_grad(), tmcore.trace(model) as t:
            out = model.forward_features(images)
    finally:
        tmcore.remove(model)
    assert t.token_counts == [65, 62, 50, 44, 24]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("variant", ["size-weighted mean", "sizes summed"])
def test_misreadings_differ(vit, variant):
    model, images = vit
    assert (reference(model, images, variant) - reference(model, images)).abs().max() > 1e-4
