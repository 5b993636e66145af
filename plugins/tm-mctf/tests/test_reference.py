"""MCTF against an independent re-implementation of the official block (mlvlab/MCTF: a DeiT block
whose merging layers compute q / k from slices of the qkv weight, merge the block input with
two-step matching and scatter_reduce, and run attention from the merged probabilities with values
of the merged tokens), written in that structure, in float64, on a tiny timm ViT (one class
token: the official protection and ours agree there)."""

from __future__ import annotations

import math

import pytest
import torch

import tmcore
from tmcore.testing.reference import float64_timm

TOL = {"rtol": 1e-9, "atol": 1e-9}
LAYERS = (1, 2, 3)


def reference_matching(x, attn, size, r, bidirection, tau=(1.0, 20.0, 40.0)):
    """Official-style scores and two-step matching; returns ``merge(t, mode)`` for ``[B, ..., N, C]``."""
    t_sim, t_info, t_size = tau
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    with torch.no_grad():
        unit = x / x.norm(dim=-1, keepdim=True)
        a, b = unit[:, ::2], unit[:, 1::2]
        scores = ((a @ b.transpose(1, 2) + 1) / 2) ** (1 / t_sim)
        inv = 1 / attn.mean(dim=(1, 2))
        inv = inv / inv.max(dim=1, keepdim=True).values
        scores = scores * (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1 / t_info)
        if size is not None:
            small = 1 / size[..., 0]
            small = small / small.max(dim=1, keepdim=True).values
            scores = scores * (small[:, ::2, None] * small[:, None, 1::2]) ** (1 / t_size)
        scores[:, :1, :] = -math.inf  # the class token (A row 0)
        best, best_idx = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
        src1, unm1 = order[:, :r1], order[:, r1:].sort(dim=1).values
        dst1 = best_idx.gather(1, src1)
        if r2:
            s2 = scores.gather(1, unm1[..., None].expand(-1, -1, scores.shape[2])).transpose(1, 2)
            best2, best_idx2 = s2.max(dim=-1)
            order2 = best2.argsort(dim=-1, descending=True, stable=True)
            src2, unm2 = order2[:, :r2], order2[:, r2:]
            dst2 = best_idx2.gather(1, src2)

    def pick(t, idx):  # gather along the token axis (-2) of a [B, ..., T, C] tensor
        shape = (idx.shape[0],) + (1,) * (t.dim() - 3) + (idx.shape[1], 1)
        return t.gather(-2, idx.view(shape).expand(*t.shape[:-2], idx.shape[1], t.shape[-1]))

    def scatter(t, idx, src, mode):
        shape = (idx.shape[0],) + (1,) * (t.dim() - 3) + (idx.shape[1], 1)
        return t.scatter_reduce(-2, idx.view(shape).expand_as(src), src, reduce=mode)

    def merge(t, mode="sum"):
        ta, tb = t[..., ::2, :], t[..., 1::2, :]
        tb = scatter(tb, dst1, pick(ta, src1), mode)
        left_a = pick(ta, unm1)
        if not r2:
            return torch.cat([left_a, tb], dim=-2)
        left_a = scatter(left_a, dst2, pick(tb, src2), mode)
        return torch.cat([left_a, pick(tb, unm2)], dim=-2)

    return merge


def attention_probs(blk, tokens, size):
    """The official one-step-ahead path: q / k from the first two thirds of the qkv weight."""
    att, y = blk.attn, blk.norm1(tokens)
    b, n, c = y.shape
    w, bias = att.qkv.weight, att.qkv.bias
    qk = (y @ w[: 2 * c].T + bias[: 2 * c]).reshape(b, n, 2, att.num_heads, c // att.num_heads).permute(2, 0, 3, 1, 4)
    logits = (qk[0] @ qk[1].transpose(-2, -1)) * att.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    return logits.softmax(dim=-1)


def reference_forward(model, images, r, recompute=False, bidirection=True, pooling="attn_size"):
    """The official DeiT forward with MCTF in ``LAYERS`` (one_step_ahead 1, or 2 with ``recompute``)."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = None
    for i, blk in enumerate(model.blocks):
        att = blk.attn
        b, n, c = x.shape
        h, d = att.num_heads, c // att.num_heads
        w, bias = att.qkv.weight, att.qkv.bias

        probs = attention_probs(blk, x, size)
        if i in LAYERS:
            merge = reference_matching(x, probs, size, r, bidirection)
            ones = size if size is not None else torch.ones_like(x[..., :1])
            if pooling == "attn_size":
                weight = probs.mean(dim=(1, 2)).unsqueeze(-1) * ones
            else:
                weight = ones
            norm = merge(weight, "sum")
            keys = merge(probs.transpose(-1, -2), "sum").transpose(-1, -2)  # [B, H, N, M]
            probs = merge(keys * weight[:, None], "sum") / norm[:, None]
            x = merge(x * weight, "sum") / norm
            size = merge(ones, "sum")
            if recompute:
                probs = attention_probs(blk, x, size)
        y = blk.norm1(x)
        v = (y @ w[2 * c :].T + bias[2 * c :]).reshape(y.shape[0], y.shape[1], h, d).transpose(1, 2)
        x = x + att.proj((probs @ v).transpose(1, 2).reshape(y.shape[0], y.shape[1], c))
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x))


@pytest.fixture(scope="module")
def setup():
    model, images = float64_timm("vit_tiny_patch16_224", depth=4, img_size=128, num_classes=10)
    with torch.no_grad():
        refs = {
            "osa1": reference_forward(model, images, 6),
            "osa2": reference_forward(model, images, 6, recompute=True),
            "uni": reference_forward(model, images, 6, bidirection=False),
            "size": reference_forward(model, images, 6, pooling="size"),
        }
    return model, images, refs


def _plugin(model, images, **config):
    tmcore.apply(model, "mctf", replace=True, r=6, layers=list(LAYERS), **config)
    try:
        with torch.no_grad():
            return model(images)
    finally:
        tmcore.remove(model)


def test_one_step_ahead_equals_reference(setup):
    model, images, refs = setup
    torch.testing.assert_close(_plugin(model, images), refs["osa1"], **TOL)


@pytest.mark.parametrize(
    ("config", "ref"),
    [({"one_step_ahead": 2}, "osa2"), ({"bidirection": False}, "uni"), ({"pooling": "size"}, "size")],
)
def test_variants_equal_reference(setup, config, ref):
    model, images, refs = setup
    torch.testing.assert_close(_plugin(model, images, **config), refs[ref], **TOL)


@pytest.mark.parametrize("misreading", ["osa2", "uni", "size"])
def test_misreadings_differ(setup, misreading):
    """Recomputed attention instead of the merged map, one-step matching, size-weighted pooling:
    each gives other outputs than the default, so the reference comparison can tell them apart."""
    model, images, refs = setup
    out = _plugin(model, images)
    assert (out - refs[misreading]).abs().max() > 1e-6
