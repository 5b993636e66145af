"""The diffusers adapter beyond the conformance suite: fused attention on the merged tokens, ToMe in
block scope (keys of the block's self-attention, proportional attention through the processor's
mask), latents of other sizes, and the errors a user can hit."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import tmcore
import tmcore.schedule

diffusers = pytest.importorskip("diffusers")
from tm_diffusers import Diffusers  # noqa: E402

ADAPTER = Diffusers()


def tiny(name):
    return Diffusers.tiny_models()[name]()


def run(model, x):
    with torch.no_grad():
        return ADAPTER.output_tensor(model, model(**x), x)


def test_describes_a_block_scope_model_with_its_grid():
    unet = tiny("unet")
    info = ADAPTER.describe(unet)
    assert (info.scope, info.grid, info.num_tokens, info.class_token, info.num_protected) == (
        "block",
        (8, 8),
        64,
        False,
        0,
    )
    assert info.num_layers == 7 and len(ADAPTER.blocks(unet)) == 7
    assert ADAPTER.describe(tiny("dit")).grid == (8, 8)  # 16 x 16 latents in 2 x 2 patches


def test_blocks_run_in_forward_order():
    unet = tiny("unet")
    order = []
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: order.append(i)) for i, b in enumerate(ADAPTER.blocks(unet))]
    run(unet, ADAPTER.example_inputs(unet))
    for h in hooks:
        h.remove()
    assert order == list(range(7))


@pytest.mark.parametrize("name", ["unet", "dit", "pixart", "sd3"])
def test_attention_stays_fused_on_the_merged_tokens(name, monkeypatch):
    model = tiny(name)
    x = ADAPTER.example_inputs(model, batch=2)
    lengths = []
    fused = torch.nn.functional.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        lengths.append(q.shape[-2])
        return fused(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    run(model, x)
    plain = list(lengths)
    tmcore.apply(model, "tomesd", ratio=0.5, seed=0)
    lengths.clear()
    run(model, x)
    assert len(lengths) == len(plain)
    assert sum(lengths) < sum(plain)
    assert 32 in lengths or 32 + 77 in lengths  # 64 tokens merged to 32 (+ 77 text tokens in SD3's joint attention)


def test_tome_in_block_scope_reads_the_keys_and_adds_log_size():
    """ToMe merges r tokens of each block around its self-attention, matched on that attention's
    keys; its proportional attention reaches the processor as an additive mask."""
    unet = tiny("unet")
    x = ADAPTER.example_inputs(unet)
    outs = {}
    tmcore.schedule.block_r.cache_clear()  # it warns once per length
    for prop_attn in (True, False):
        tmcore.apply(unet, "tome", r=20, prop_attn=prop_attn, replace=True)
        with pytest.warns(tmcore.ScheduleClampWarning, match="block 1") if prop_attn else nullcontext():
            with tmcore.trace(unet) as t:
                outs[prop_attn] = run(unet, x)
        assert t.merged_counts == [44, 8, 8, 8, 8, 44, 44]  # r=20, capped at half of the 16-token blocks
    assert not torch.allclose(outs[True], outs[False])


def test_latents_of_another_size_get_their_own_grids():
    unet = tiny("unet")
    x = ADAPTER.example_inputs(unet, batch=2)
    x["sample"] = torch.randn(2, 4, 6, 10, dtype=torch.float64)  # 60 tokens, then 3 x 5 = 15
    tmcore.apply(unet, "tomesd", ratio=0.5, max_downsample=2, seed=0)
    with tmcore.trace(unet) as t:
        out = run(unet, x)
    assert out.shape == (2, 4, 6, 10)
    assert t.merged_counts == [30, 8, 8, 8, 8, 30, 30]


def test_a_caller_attention_mask_with_proportional_attention_is_refused():
    dit = tiny("dit")
    x = ADAPTER.example_inputs(dit)
    tmcore.apply(dit, "tome", r=4)
    block = ADAPTER.blocks(dit)[0]
    h = torch.randn(3, 64, 16, dtype=torch.float64)
    emb = torch.zeros(3, dtype=torch.long)
    with pytest.raises(tmcore.TmcoreError, match="attention_mask"), torch.no_grad():
        tmcore.get_patch(dit).runtime.begin(grid=(8, 8))
        try:
            block(h, attention_mask=torch.zeros(3, 1, 64, dtype=torch.float64), timestep=emb, class_labels=emb)
        finally:
            tmcore.get_patch(dit).runtime.end()
    assert torch.isfinite(run(dit, x)).all()


def test_chunked_feed_forward_cannot_be_merged():
    unet = tiny("unet")
    for block in ADAPTER.blocks(unet):
        block.set_chunk_feed_forward(16, 1)
    x = ADAPTER.example_inputs(unet)
    tmcore.apply(unet, "tomesd", ratio=0.5, merge_mlp=True)
    with pytest.raises(tmcore.TmcoreError, match="chunking"):
        run(unet, x)
    tmcore.apply(unet, "tomesd", ratio=0.5, replace=True)  # self-attention only: chunking is fine
    assert torch.isfinite(run(unet, x)).all()


def test_continuous_transformer_is_refused_with_a_pointer_to_the_unet():
    inner = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8)
    with pytest.raises(tmcore.NoAdapterError, match="apply tmcore to the UNet"):
        tmcore.apply(inner, "tomesd")


def test_every_other_reducer_is_refused_by_scope():
    dit = tiny("dit")
    for name in ("pitome", "tofu", "random", "atc", "mctf", "diffrate", "ltmp", "ppt", "tomecis", "topk"):
        if name in tmcore.reducers():
            with pytest.raises(tmcore.UnsupportedModelError, match=r"reducers for it: .*tome.*tomesd"):
                tmcore.apply(dit, name, **tmcore.reducers()[name].obj.example_configs[0])


def test_sd3_joint_attention_takes_no_size_bias():
    """SD3's joint attention processor ignores attention masks: ToMe runs there without
    proportional attention by default, and asking for it is refused, not silently dropped."""
    sd3 = tiny("sd3")
    assert not ADAPTER.describe(sd3).size_bias and ADAPTER.describe(tiny("dit")).size_bias
    with pytest.raises(tmcore.UnsupportedModelError, match="prop_attn=False"):
        tmcore.apply(sd3, "tome", r=8, prop_attn=True)
    tmcore.apply(sd3, "tome", r=8)
    assert not tmcore.get_patch(sd3).reducer.prop_attn
    assert torch.isfinite(run(sd3, ADAPTER.example_inputs(sd3))).all()
