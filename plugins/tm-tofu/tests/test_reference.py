"""ToFu against a reference written from the paper (Kim et al., WACV 2024) in the structure of
ToMe's code, as the public re-implementations are: ToMe's bipartite matching, then in early blocks
the gathered sources are not scattered back (pruning) and in late blocks each destination becomes
the MLERP of its group: the size-weighted mean's direction with the largest member norm."""

from __future__ import annotations

import pytest
import torch

import tmcore
from tmcore.testing.reference import bipartite_soft_matching as reference_bsm
from tmcore.testing.reference import float64_timm, merge_wavg, vit_forward


def pruned(merge, x):
    """ToMe's merge closure with the sources dropped: unmerged A tokens and B tokens keep their
    own values. Two ``amax`` passes: with every A token at ``-inf`` the B slots hold their own
    value (unmerged A slots ``-inf``); with every B token at ``-inf`` the unmerged A slots do."""
    is_a = torch.zeros_like(x[..., :1], dtype=torch.bool)
    is_a[:, ::2] = True
    b_own = merge(x.masked_fill(is_a, -torch.inf), mode="amax")
    a_own = merge(x.masked_fill(~is_a, -torch.inf), mode="amax")
    return torch.where(torch.isinf(b_own), a_own, b_own)


def reference_tofu_forward(model, images, r_list, switch, prop_attn=True):
    """The forward of a ToMe-patched timm ViT with ToFu's two strategies (no LayerScale)."""

    def reduce(layer, x, size, k):
        if r_list[layer] == 0:
            return x, size
        merge = reference_bsm(k.mean(1), r_list[layer], True, False)
        if size is None:
            size = torch.ones_like(x[..., :1])
        if layer <= switch:  # prune: the sources and their sizes are gone, destinations unchanged
            return pruned(merge, x), pruned(merge, size)
        mean, new_size = merge_wavg(merge, x, size)
        largest = merge(x.norm(dim=-1, keepdim=True), mode="amax")
        members = merge(torch.ones_like(size), mode="sum")
        mlerp = mean / mean.norm(dim=-1, keepdim=True) * largest
        return torch.where(members > 1, mlerp, mean), new_size

    return model.forward_head(vit_forward(model, images, reduce, prop_attn)[0])


@pytest.mark.parametrize("r,switch", [(13, 1), (8, -1), (10, 3)])
def test_model_equals_reference(r, switch):
    pytest.importorskip("timm")
    model, images = float64_timm("deit_small_patch16_224", depth=4)
    with torch.no_grad():
        ref = reference_tofu_forward(model, images, tmcore.parse_r(4, r), switch)
        out = tmcore.apply(model, "tofu", r=r, switch=switch)(images)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_default_switch_is_half_the_depth():
    pytest.importorskip("timm")
    model, images = float64_timm("deit_tiny_patch16_224", depth=6)
    with torch.no_grad():
        ref = reference_tofu_forward(model, images, [8] * 6, switch=3)
        out = tmcore.apply(model, "tofu", r=8)(images)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("misreading", ["average", "prune_late", "no_sizes"])
def test_misreadings_differ(misreading):
    """Plausible misreadings give other logits: plain averaging (ToMe), the strategies swapped,
    and MLERP over an unweighted mean."""
    pytest.importorskip("timm")
    model, images = float64_timm("deit_tiny_patch16_224", depth=4)
    with torch.no_grad():
        out = tmcore.apply(model, "tofu", r=12, switch=1)(images)
        tmcore.remove(model)
        if misreading == "average":
            ref = tmcore.apply(model, "tome", r=12)(images)
        elif misreading == "prune_late":
            ref = reference_tofu_forward(model, images, [12] * 4, switch=-1)
        else:
            ref = tmcore.apply(model, "tofu", r=12, switch=1, merge_rule="reimplementation")(images)
    assert (out - ref).abs().max() > 1e-6
