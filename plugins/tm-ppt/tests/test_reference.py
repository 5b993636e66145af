"""PPT against a reference written from docs/algorithms.md 1.3-1.5 and 6.2-6.3 in the structure of the
original ``ppt_deit.py`` (ATS significance from the CLS attention row and C-dim value norms, a
per-image variance test, ToMe pooling on one sub-batch and top-score pruning on the other, both
written back at their batch positions), compared in float64.

Where the implementation deliberately departs from the original, the reference follows the
implementation: with a distillation token both prefix tokens are protected from pruning and left out
of the significance normalisation and variance; with ``prop_attn=False`` pooling weighs tokens
equally (the original's all-ones ``bias``) while the traced sizes are the real ones. Sorting is
stable here, as in the implementation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch

import tmcore
from tmcore.testing.reference import bipartite_soft_matching as reference_bsm
from tmcore.testing.reference import float64_timm, vit_forward

TOL = {"rtol": 1e-9, "atol": 1e-9}


def reference_scores(attn, values, protected):
    """ATS significance (docs/algorithms.md 6.2): the prefix gets 2.0, patches are normalised to sum 1."""
    b, h, n, d = values.shape
    # The value norm is taken over all heads concatenated (C-dim), as in ATS, not the head mean.
    v_norm = values.transpose(1, 2).reshape(b, n, h * d).norm(p=2, dim=-1)
    sig = attn[:, :, 0, :].sum(dim=1) * v_norm
    sig = sig[:, protected:]
    sig = sig / sig.sum(dim=1, keepdim=True)
    return torch.cat([sig.new_full((b, protected), 2.0), sig], dim=1)


@dataclass
class RefInfo:
    """What the reference saw: the pool mask of every adaptive layer and the per-block counts."""

    pool: dict[int, torch.Tensor] = field(default_factory=dict)
    variance: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: list[int] = field(default_factory=list)


def reference_ppt_forward(model, images, r, layers, threshold, prop_attn=True):
    """The original ``pp_block_adaptive`` forward; returns ``(logits, final size, RefInfo)``."""
    distilled = getattr(model, "dist_token", None) is not None
    protected = 1 + int(distilled)
    info = RefInfo()

    def reduce(layer, x, size, keys, attn, values):
        b, n, c = x.shape
        info.counts.append(n)
        if layer not in layers:
            return x, size
        ones = torch.ones_like(x[..., :1])
        # The original's `bias`: the merge weights (and the sizes it keeps); ones without prop_attn.
        bias = size if (prop_attn and size is not None) else ones
        # The implementation still traces real sizes when prop_attn is off; they feed nothing else.
        tracked = size if size is not None else ones
        rr = min(r, (n - 1) // 2)
        scores = reference_scores(attn, values, protected)
        var = scores[:, protected:].var(dim=1, unbiased=True)
        pool = var < threshold
        info.pool[layer], info.variance[layer] = pool, var
        if rr <= 0:
            return x, size

        new_x = x.new_zeros(b, n - rr, c)
        new_size = x.new_zeros(b, n - rr, 1)
        pool_idx = pool.nonzero(as_tuple=True)[0]
        prune_idx = (~pool).nonzero(as_tuple=True)[0]
        if len(pool_idx) > 0:
            merge = reference_bsm(keys[pool_idx].mean(dim=1), rr, True, distilled)
            w = bias[pool_idx]
            new_x[pool_idx] = merge(x[pool_idx] * w, mode="sum") / merge(w, mode="sum")
            new_size[pool_idx] = merge(tracked[pool_idx], mode="sum")
        if len(prune_idx) > 0:
            # Prefix scores are 2 (> any normalised score), so a stable descending sort keeps them in
            # front, in order; the kept patches come out sorted by significance.
            keep = scores[prune_idx].argsort(dim=1, descending=True, stable=True)[:, : n - rr]
            new_x[prune_idx] = x[prune_idx].gather(1, keep[..., None].expand(-1, -1, c))
            new_size[prune_idx] = tracked[prune_idx].gather(1, keep[..., None])
        return new_x, new_size

    with torch.no_grad():
        tokens, size = vit_forward(model, images, reduce, prop_attn=prop_attn, attention=True)
        info.counts.append(tokens.shape[1])
        return model.forward_head(tokens), size, info


def run_tmcore(model, images, **config):
    """``model(images)`` under tmcore's PPT, with the trace of that same forward."""
    with warnings.catch_warnings():
        # The cap of r at (N - 1) // 2 is part of the method, not a problem here.
        warnings.simplefilter("ignore", tmcore.ScheduleClampWarning)
        tmcore.apply(model, "ppt", **config)
    with torch.no_grad(), tmcore.trace(model) as t:
        out = model(images)
    return out, t


def check_against_reference(model, images, r, layers, threshold, prop_attn):
    ref_out, ref_size, info = reference_ppt_forward(model, images, r, layers, threshold, prop_attn)
    out, t = run_tmcore(model, images, r=r, layers=layers, threshold=threshold, prop_attn=prop_attn)
    torch.testing.assert_close(out, ref_out, **TOL)
    assert [int(c) for c in t.token_counts] == info.counts
    assert all(isinstance(c, int) for c in t.token_counts)
    torch.testing.assert_close(t.sizes.double(), ref_size, **TOL)
    return info


def small_deit(name="deit_small_patch16_224"):
    pytest.importorskip("timm")
    model, images = float64_timm(name, depth=12, img_size=96, batch=4)
    return model, images


def mixed_threshold(model, images, r, layers, prop_attn):
    """A threshold between the per-image variances of the first adaptive layer, which no earlier
    reduction influences, so it splits the batch there whatever the threshold does later."""
    _, _, info = reference_ppt_forward(model, images, r, layers, math.inf, prop_attn)
    var = info.variance[layers[0]].sort().values
    k = len(var) // 2
    assert var[k - 1] < var[k]
    return float((var[k - 1] + var[k]) / 2)


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("threshold", ["inf", "zero", "-inf", "mixed"])
def test_model_equals_reference(threshold, prop_attn):
    model, images = small_deit()
    r, layers = 6, [2, 5, 8]
    value = {"inf": math.inf, "zero": 0.0, "-inf": -math.inf}.get(threshold)
    if value is None:
        value = mixed_threshold(model, images, r, layers, prop_attn)
    info = check_against_reference(model, images, r, layers, value, prop_attn)
    assert info.counts == [37] * 3 + [31] * 3 + [25] * 3 + [19] * 3 + [19]
    pooled = torch.stack([info.pool[layer] for layer in layers])
    if threshold == "inf":
        assert pooled.all()
    elif threshold in ("zero", "-inf"):
        assert not pooled.any()
    else:
        assert 0 < int(info.pool[layers[0]].sum()) < len(images)


def test_model_equals_reference_with_clamped_r():
    # r = 20 exceeds (N - 1) // 2 at every adaptive layer: 37 -> 19 -> 10 -> 6.
    model, images = small_deit()
    layers = [2, 5, 8]
    threshold = mixed_threshold(model, images, 20, layers, True)
    info = check_against_reference(model, images, 20, layers, threshold, True)
    assert info.counts[-1] == 6
    assert 0 < int(info.pool[layers[0]].sum()) < len(images)


@pytest.mark.parametrize("prop_attn", [True, False])
def test_distilled_model_equals_reference(prop_attn):
    # An even r keeps N even (38 tokens in), where the original's (N - 1) // 2 cap and the
    # two-prefix (N - 2) // 2 cap agree.
    model, images = small_deit("deit_small_distilled_patch16_224")
    r, layers = 6, [2, 5, 8]
    threshold = mixed_threshold(model, images, r, layers, prop_attn)
    info = check_against_reference(model, images, r, layers, threshold, prop_attn)
    assert info.counts[-1] == 38 - 3 * r
    assert 0 < int(info.pool[layers[0]].sum()) < len(images)


def test_readme_defaults_equal_reference():
    # With random weights every image pools here (variances stay below 7e-5); the point is the
    # README schedule at full resolution, including the third layer's cap of r to 48.
    pytest.importorskip("timm")
    model, images = float64_timm("deit_small_patch16_224", depth=12)
    ref_out, ref_size, info = reference_ppt_forward(model, images, 50, [3, 6, 9], 7e-5)
    out, t = run_tmcore(model, images)
    torch.testing.assert_close(out, ref_out, **TOL)
    assert info.counts == [197] * 4 + [147] * 3 + [97] * 3 + [49] * 2 + [49]
    assert [int(c) for c in t.token_counts] == info.counts
    torch.testing.assert_close(t.sizes.double(), ref_size, **TOL)
