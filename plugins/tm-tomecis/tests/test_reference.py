"""ToMeCIS against a reference written from docs/algorithms.md 1.3-1.5 and 5.2 in the original's
structure: ToMe's parity-split matching closure on head-mean keys, features averaged with the class
importance score ``mean_h A[h, 0, j] * ||mean_h V[h, j]||`` instead of sizes, sizes still summed for
proportional attention. Tie-breaking is the one deliberate difference: both sort stably here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tmcore
from tmcore.testing import matching_cases
from tmcore.testing.reference import bipartite_soft_matching, float64_timm, vit_forward

TOL = {"rtol": 1e-9, "atol": 1e-9}


def class_importance(attn, values):
    """docs/algorithms.md 5.2: CLS attention row times the norm of the head-averaged value, ``[B, N, 1]``."""
    cls_attn = attn[:, :, 0, :].mean(dim=1)
    value_norm = values.mean(dim=1).norm(dim=-1)
    return (cls_attn * value_norm)[..., None]


def reference_tomecis_forward(model, images, r_list, prop_attn=True):
    """The original ToMeCIS patch's forward on a timm ViT / DeiT (no LayerScale, no QK-norm)."""
    distilled = getattr(model, "dist_token", None) is not None

    def reduce(layer, x, size, keys, attn, values):
        # the original guards the merge with r > 0 (its identity closure rejects mode=)
        if r_list[layer] == 0:
            return x, size
        merge = bipartite_soft_matching(keys.mean(dim=1), r_list[layer], True, distilled)
        if size is None:
            size = torch.ones_like(x[..., :1])
        cis = class_importance(attn, values)
        x = merge(x * cis, mode="sum") / merge(cis, mode="sum")
        return x, merge(size, mode="sum")

    tokens, _ = vit_forward(model, images, reduce, prop_attn=prop_attn, attention=True)
    return model.forward_head(tokens)


@settings(max_examples=150, deadline=None)
# No duplicated tokens: the original breaks an exact tie by the last bit its matmul happens to
# round (which depends on the shape); tmcore by position (tests/test_padding.py checks ties).
@given(case=matching_cases(max_protected=2, duplicates=False), seed=st.integers(0, 2**31 - 1))
def test_weighted_merge_equals_reference(case, seed):
    """A weighted merge through tmcore's Plan equals the closure's ``merge(x * w) / merge(w)``,
    with sizes summed, for p = 0 (no special token), 1 (class) and 2 (class + distillation)."""
    if case.r == 0:
        return
    p = case.num_protected
    gen = torch.Generator().manual_seed(seed)
    # positive weights spanning orders of magnitude, like CIS values of real attention rows
    weight = torch.rand(case.x.shape[0], case.x.shape[1], 1, generator=gen, dtype=torch.float64)
    weight = weight.pow(3) + 1e-3

    ref = bipartite_soft_matching(case.metric, case.r, p >= 1, p == 2)
    ref_x = ref(case.x * weight, mode="sum") / ref(weight, mode="sum")
    ref_size = ref(case.size, mode="sum")

    plan = tmcore.bipartite_soft_matching(case.metric, case.r, p)
    x, size = tmcore.merge_tokens(case.x, plan.with_weight(weight), case.size)
    torch.testing.assert_close(size, ref_size, rtol=0, atol=0)
    torch.testing.assert_close(x, ref_x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224"])
@pytest.mark.parametrize("r", [13, (8, -1)])
def test_model_equals_reference(name, r):
    """Logits of a patched DeiT (with and without distillation token) equal the reference's, for a
    constant schedule and the decreasing one (whose last block has r = 0)."""
    pytest.importorskip("timm")
    model, images = float64_timm(name, depth=4)
    with torch.no_grad():
        ref = reference_tomecis_forward(model, images, tmcore.parse_r(4, r))
        out = tmcore.apply(model, "tomecis", r=r)(images)
    torch.testing.assert_close(out, ref, **TOL)


def test_model_equals_reference_without_prop_attn():
    """With proportional attention off, sizes must not reach the attention logits (and so not CIS)."""
    pytest.importorskip("timm")
    model, images = float64_timm("deit_tiny_patch16_224", depth=3)
    with torch.no_grad():
        ref = reference_tomecis_forward(model, images, [20, 20, 20], prop_attn=False)
        out = tmcore.apply(model, "tomecis", r=20, prop_attn=False)(images)
    torch.testing.assert_close(out, ref, **TOL)


def test_reference_is_not_tome():
    """Guards the reference itself: CIS weighting must change the output compared with size
    weighting, or the model tests above would not tell ToMeCIS from ToMe."""
    pytest.importorskip("timm")
    model, images = float64_timm("deit_tiny_patch16_224", depth=2, batch=1)
    with torch.no_grad():
        cis = reference_tomecis_forward(model, images, [20, 20])
        tome = tmcore.apply(model, "tome", r=20)(images)
    assert not torch.allclose(cis, tome, rtol=1e-6, atol=1e-6)
