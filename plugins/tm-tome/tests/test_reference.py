"""ToMe against a reference written from docs/algorithms.md 1.3-1.5 in the original's structure
(parity split, gather unmerged / sources, scatter into B, concatenate; explicit softmax attention
with ``+ log(size)``). Tie-breaking is the one deliberate difference: both sort stably here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tmcore
from tmcore.testing import matching_cases
from tmcore.testing.reference import bipartite_soft_matching as reference_bsm
from tmcore.testing.reference import float64_timm, merge_wavg, vit_forward


def reference_tome_forward(model, images, r_list, prop_attn=True):
    """The original timm patch's forward on a timm ViT / DeiT (no LayerScale, no QK-norm)."""
    distilled = getattr(model, "dist_token", None) is not None

    def reduce(layer, x, size, k):
        if r_list[layer] == 0:
            return x, size
        return merge_wavg(reference_bsm(k.mean(1), r_list[layer], True, distilled), x, size)

    return model.forward_head(vit_forward(model, images, reduce, prop_attn)[0])


# No duplicated tokens: the original breaks an exact tie by the last bit its matmul happens to
# round (which depends on the shape); tmcore by position (tests/test_padding.py checks ties).
@settings(max_examples=150, deadline=None)
@given(case=matching_cases(max_protected=2, duplicates=False), distill=st.booleans())
def test_matching_equals_reference(case, distill):
    p = case.num_protected
    if distill and p < 2:
        p = 0
    class_token, distill_token = p >= 1, p == 2
    plan = tmcore.bipartite_soft_matching(case.metric, case.r, p) if case.r else None
    ref = reference_bsm(case.metric, case.r, class_token, distill_token)
    ref_x, ref_size = merge_wavg(ref, case.x, case.size)
    if plan is None:
        return
    x, size = tmcore.merge_weighted(case.x, plan, case.size)
    torch.testing.assert_close(size, ref_size, rtol=0, atol=0)
    torch.testing.assert_close(x, ref_x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224"])
@pytest.mark.parametrize("r", [13, (8, -1)])
def test_model_equals_reference(name, r):
    pytest.importorskip("timm")
    model, images = float64_timm(name, depth=4)
    with torch.no_grad():
        ref = reference_tome_forward(model, images, tmcore.parse_r(4, r))
        tmcore.apply(model, "tome", r=r)
        out = model(images)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_model_equals_reference_without_prop_attn():
    pytest.importorskip("timm")
    model, images = float64_timm("deit_tiny_patch16_224", depth=3)
    with torch.no_grad():
        ref = reference_tome_forward(model, images, [20, 20, 20], prop_attn=False)
        out = tmcore.apply(model, "tome", r=20, prop_attn=False)(images)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
