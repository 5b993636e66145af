"""The adapter contract's core pieces: reduction positions, full_length, the FLOP model."""

from __future__ import annotations

import pytest
import torch

import tmcore
from tmcore import bipartite_soft_matching, merge_tokens
from tmcore.flops import BlockFlops
from tmcore.testing import tiny_timm_models

pytest.importorskip("timm")


def test_a_position_the_adapter_does_not_offer_is_refused(monkeypatch):
    from tm_timm.adapter import TimmViT
    from tm_tome.reducer import ToMe

    model = tiny_timm_models()["vit"]()
    monkeypatch.setattr(TimmViT, "positions", frozenset({"attention"}))
    monkeypatch.setattr(ToMe, "position", "layer", raising=False)
    with pytest.raises(tmcore.UnsupportedModelError, match="position 'layer'.*offers \\['attention'\\]"):
        tmcore.apply(model, "tome", r=4)
    assert tmcore.get_patch(model) is None


def test_reducing_after_the_block_merges_the_blocks_output(monkeypatch):
    """position 'layer': the block's output is the unpatched block's output, merged by the plan
    from that block's keys (the MLP ran on every token)."""
    from timm.models.vision_transformer import VisionTransformer

    from tm_tome.reducer import ToMe

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=1, num_heads=3).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keys = []
    hook = model.blocks[0].attn.k_norm.register_forward_hook(lambda m, a, out: keys.append(out.mean(1)))
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(x))
        y = model.blocks[0](tokens)
        plan = bipartite_soft_matching(keys[0], 4, 1)
        ref = model.norm(merge_tokens(y, plan, None)[0])
    hook.remove()
    monkeypatch.setattr(ToMe, "position", "layer", raising=False)
    tmcore.apply(model, "tome", r=4)
    with torch.no_grad():
        out = model.forward_features(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_full_length_must_be_a_bool():
    model = tiny_timm_models()["vit"]()
    with pytest.raises(tmcore.InvalidConfigError, match="full_length='yes'"):
        tmcore.apply(model, "tome", r=4, full_length="yes")


def test_full_length_round_trips_through_save_and_load(tmp_path):
    model = tiny_timm_models()["vit"]()
    tmcore.apply(model, "tome", r=4, full_length=True)
    tmcore.save(model, tmp_path / "tome.safetensors")
    other = tmcore.load(tiny_timm_models()["vit"](), tmp_path / "tome.safetensors")
    assert tmcore.get_patch(other).runtime.full_length is True


def test_block_flops_match_the_vit_formula():
    flops = BlockFlops(dim=384, mlp_hidden=1536)
    n, n_out = 197, 184
    assert flops.block(n, n_out) == 4 * n * 384**2 + 2 * n * n * 384 + 8 * n_out * 384**2
    after = BlockFlops(dim=384, mlp_hidden=1536, position="layer")
    assert after.block(n, n_out) == flops.block(n, n)
    per_sample = flops.macs([torch.tensor([197.0, 100.0]), torch.tensor([184.0, 90.0])])
    assert per_sample.shape == (2,) and per_sample[0] == flops.block(197, 184)
