"""LTMP against a reference written from docs/algorithms.md 4.3-4.7 in the original's structure:
an explicit attention returning (output, head-mean keys, column-mean importance with CLS = inf),
then per block either the masked training step (parity split, straight-through masks, scatter
into B, dead tokens keep their slots) or the inference step at batch size 1 (boolean selection
and reshape). tmcore runs the same tiny timm ViT (float64) through its adapter: training-mode
logits, masks and threshold gradients, and inference logits image by image out of one ragged
batch, must equal the reference."""

from __future__ import annotations

import math

import pytest
import torch

import tm_ltmp
import tmcore
from tmcore.testing import tiny_timm_models

TAU = 0.5
EPS = 1e-5
THRESHOLDS = {  # (merge, prune) per block: every operation fires, differently per image
    "merge_prune": ([0.55, 0.6, 0.6, 0.7], [0.0153, 0.016, 0.017, 0.02]),
    "prune_merge": ([0.55, 0.6, 0.6, 0.7], [0.0153, 0.018, 0.02, 0.025]),
    "merge": ([0.5, 0.55, 0.6, 0.6], [0.0, 0.0, 0.0, 0.0]),
    "prune": ([1.0, 1.0, 1.0, 1.0], [0.01536, 0.0192, 0.0193, 0.0194]),
}


def ste(values, theta, tau):
    soft = torch.sigmoid((values - theta) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return soft + (hard - soft).detach()


def softmax_with_mask(logits, mask):
    weights = (logits - logits.max(dim=-1, keepdim=True)[0]).exp() * mask[:, None, None, :]
    return (weights + EPS / weights.shape[-1]) / (weights.sum(dim=-1, keepdim=True) + EPS)


def attention(blk, x, size, mask):
    """timm Attention written out, + log(size), masked softmax when ``mask`` is given."""
    attn = blk.attn
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size[:, None, None, :, 0].log()
    probs = logits.softmax(dim=-1) if mask is None else softmax_with_mask(logits, mask)
    out = attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
    imp = probs.mean(dim=(1, 2))
    imp[..., 0] = math.inf
    return out, k.mean(1), imp


def similarity(metric, mask=None):
    metric = metric / metric.norm(dim=-1, keepdim=True)
    if mask is not None:
        metric = metric * mask[..., None].detach()
    scores = metric[..., ::2, :] @ metric[..., 1::2, :].transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    return scores.max(dim=-1)


def train_block(blk, mode, x, size, mask, th_m, th_p):
    use_size = size if mode != "prune" else None
    y, metric, imp = attention(blk, blk.norm1(x), use_size, mask)
    if mode in ("prune", "prune_merge"):
        keep = ste(imp, th_p, TAU)
        mask = mask.clone()
        alive = mask.bool()
        mask[alive] = keep[alive]
    x = x + y
    if mode != "prune":
        c = x.shape[-1]
        x = x * size
        src_x, dst_x = x[..., ::2, :], x[..., 1::2, :]
        src_s, dst_s = size[..., ::2, :], size[..., 1::2, :]
        src_m, dst_m = mask[..., ::2], mask[..., 1::2]
        src_i, dst_i = imp[..., ::2], imp[..., 1::2]
        best, idx = similarity(metric, mask)
        merged = ste(best, th_m, TAU)
        unmerged = 1 - merged
        dead = ~src_m.bool()
        unmerged[dead] = src_m[dead]
        w = merged.detach()
        dst_x = dst_x.scatter_reduce(1, idx[..., None].expand(-1, -1, c), src_x * w[..., None], reduce="sum")
        dst_s = dst_s.scatter_reduce(1, idx[..., None], src_s * w[..., None], reduce="sum")
        x = torch.cat([src_x, dst_x], dim=1)
        size = torch.cat([src_s, dst_s], dim=1)
        mask = torch.cat([unmerged, dst_m], dim=1)
        x = x / size
        if mode == "merge_prune":
            group = src_i * w
            group[..., 0] = 0
            dst_i = dst_i.scatter_reduce(1, idx, group, reduce="amax")
            imp = torch.cat([src_i, dst_i], dim=1)
            keep = ste(imp, th_p, TAU)
            alive = mask.bool()
            mask = mask.clone()
            mask[alive] = keep[alive]
    x = x + blk.mlp(blk.norm2(x))
    return x, size, mask


def infer_block(blk, mode, x, size, th_m, th_p):
    """Batch size 1 only: boolean selections reshaped back to [1, -1, C]."""
    use_size = size if mode != "prune" else None
    y, metric, imp = attention(blk, blk.norm1(x), use_size, None)
    x = x + y
    c = x.shape[-1]
    if mode in ("prune", "prune_merge"):
        keep = imp > th_p
        x, size, metric = x[keep].reshape(1, -1, c), size[keep].reshape(1, -1, 1), metric[keep][None]
        imp = imp[keep][None]
    if mode != "prune":
        best, idx = similarity(metric)
        merged = best > th_m
        x = x * size
        src_x, dst_x = x[..., ::2, :], x[..., 1::2, :]
        src_s, dst_s = size[..., ::2, :], size[..., 1::2, :]
        src_i, dst_i = imp[..., ::2], imp[..., 1::2]
        to = idx[merged][None]
        dst_x = dst_x.scatter_reduce(1, to[..., None].expand(-1, -1, c), src_x[merged][None], reduce="sum")
        dst_s = dst_s.scatter_reduce(1, to[..., None], src_s[merged][None], reduce="sum")
        dst_i = dst_i.scatter_reduce(1, to, src_i[merged][None], reduce="amax")
        x = torch.cat([src_x[~merged][None], dst_x], dim=1)
        size = torch.cat([src_s[~merged][None], dst_s], dim=1)
        imp = torch.cat([src_i[~merged][None], dst_i], dim=1)
        if mode == "merge_prune":
            keep = imp > th_p
            x, size = x[keep].reshape(1, -1, c), size[keep].reshape(1, -1, 1)
        x = x / size
    x = x + blk.mlp(blk.norm2(x))
    return x, size


def reference_forward(model, images, mode, th_m, th_p, training):
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = torch.ones_like(x[..., :1])
    mask = torch.ones_like(x[..., 0])
    masks = []
    for layer, blk in enumerate(model.blocks):
        if training:
            x, size, mask = train_block(blk, mode, x, size, mask, th_m[layer], th_p[layer])
            masks.append(mask)
        else:
            x, size = infer_block(blk, mode, x, size, th_m[layer], th_p[layer])
    return model.forward_head(model.norm(x)), masks


def _model_and_images(batch):
    model = tiny_timm_models()["vit"]()
    images = torch.randn(batch, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return model, images


@pytest.mark.parametrize("mode", sorted(THRESHOLDS))
def test_training_forward_and_gradients_equal_reference(mode):
    merge, prune = THRESHOLDS[mode]
    model, images = _model_and_images(3)
    model.train()
    th_m = torch.tensor(merge, dtype=torch.float32).double().requires_grad_()
    th_p = torch.tensor(prune, dtype=torch.float32).double().requires_grad_()
    ref, ref_masks = reference_forward(model, images, mode, th_m, th_p, training=True)
    ratio_ref = tm_ltmp.flops_ratio(ref_masks, 65, 48)
    (ref.square().mean() + ratio_ref).backward()

    tmcore.apply(model, "ltmp", mode=mode, tau=TAU, merge_threshold=merge, prune_threshold=prune)
    with tmcore.trace(model) as t:
        out = model(images)
    ratio = tm_ltmp.flops_ratio(t.masks, 65, 48)
    (out.square().mean() + ratio).backward()
    params = tm_ltmp.thresholds(model)

    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    for mine, theirs in zip(t.masks, ref_masks):
        assert torch.equal(mine, theirs)
    assert 0 < float(ratio.detach()) < 1, "the thresholds should remove something"
    grads = {"merge": th_m.grad, "prune": th_p.grad}
    for kind in ("merge", "prune"):
        if (kind == "merge" and mode == "prune") or (kind == "prune" and mode == "merge"):
            assert params[kind].grad is None or not params[kind].grad.any()
            continue
        assert grads[kind].abs().sum() > 0, f"no gradient reaches the {kind} thresholds"
        torch.testing.assert_close(params[kind].grad.double(), grads[kind], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("mode", sorted(THRESHOLDS))
def test_inference_equals_reference_image_by_image(mode):
    merge, prune = THRESHOLDS[mode]
    model, images = _model_and_images(4)
    th_m = torch.tensor(merge, dtype=torch.float32).double()
    th_p = torch.tensor(prune, dtype=torch.float32).double()
    with torch.no_grad():
        refs = [reference_forward(model, images[i : i + 1], mode, th_m, th_p, training=False)[0] for i in range(4)]
        tmcore.apply(model, "ltmp", mode=mode, merge_threshold=merge, prune_threshold=prune)
        with tmcore.trace(model) as t:
            out = model(images)  # one ragged batch
    torch.testing.assert_close(out, torch.cat(refs), rtol=1e-9, atol=1e-9)
    final = t.token_counts[-1]
    assert isinstance(final, torch.Tensor) and len(set(final.tolist())) > 1, f"equal counts {t.token_counts}"
