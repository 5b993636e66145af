"""ToMeCIS beyond the conformance suite: what equal weights reduce it to, where its class row comes
from, its counts and schedule (ToMe's), and its configuration errors."""

from __future__ import annotations

import pytest
import torch

import tm_tomecis.reducer as cis_module
import tmcore
from tm_tome import ToMe
from tmcore import InvalidConfigError, ScheduleClampWarning, UnsupportedModelError
from tmcore.registry import Registration, registry
from tmcore.testing import tiny_timm_models

timm = pytest.importorskip("timm")


@pytest.fixture
def vit():
    return tiny_timm_models()["vit"]()


def _images(batch=2, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


class _PlainMeanToMe(ToMe):
    """ToMe whose merged groups are plain means of their tokens (sizes still summed)."""

    name = "tome_plain_mean"

    def match(self, layer, scores, state):
        plan = super().match(layer, scores, state)
        return None if plan is None else plan.with_equal_weights()


@pytest.mark.parametrize("name", ["vit", "deit_distilled"])
def test_equal_importance_is_tome_with_plain_means(monkeypatch, name):
    """With every token equally important, ToMeCIS is exactly ToMe's matching, schedule, summed
    sizes and proportional attention, with each merged group's features averaged as a plain mean
    of its current tokens instead of by size."""
    registry.ensure_loaded()
    monkeypatch.setitem(
        registry.reducers, "tome_plain_mean", Registration("tome_plain_mean", _PlainMeanToMe, "tests", "0")
    )
    monkeypatch.setattr(cis_module, "class_importance", lambda cls_attn, values: torch.full_like(cls_attn[:, 0], 0.3))
    x = _images(3)
    results = []
    for reducer in ("tomecis", "tome_plain_mean"):
        model = tmcore.apply(tiny_timm_models()[name](), reducer, r=[9, 7, 5, 3])
        with torch.no_grad(), tmcore.trace(model) as t:
            results.append((model(x), t.sizes, t.source, t.token_counts))
    (out, sizes, source, counts), (ref_out, ref_sizes, ref_source, ref_counts) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert torch.equal(sizes, ref_sizes) and torch.equal(source, ref_source) and counts == ref_counts
    # and it is not ToMe itself, whose groups are size-weighted
    tome = tmcore.apply(tiny_timm_models()[name](), "tome", r=[9, 7, 5, 3])
    with torch.no_grad():
        assert not torch.allclose(tome(x), out, rtol=1e-6, atol=1e-6)


def test_importance_uses_the_class_row_of_the_full_attention_with_the_size_bias(monkeypatch):
    """The class row each block weighs merges with is row 0 of the block's full attention
    matrix, ``log(size)`` bias included, though the block itself runs fused attention."""
    seen = []
    real = cis_module.class_importance

    def recording(cls_attn, values):
        seen.append((cls_attn, values))
        return real(cls_attn, values)

    monkeypatch.setattr(cis_module, "class_importance", recording)
    model = tmcore.apply(tiny_timm_models()["layerscale_qknorm"](), "tomecis", r=8)
    normed, sizes, fused = [], [], []
    for blk in model.blocks:
        blk.norm1.register_forward_hook(lambda m, a, out: normed.append(out))
        blk.attn.register_forward_hook(lambda m, a, out: fused.append(1))
    runtime = tmcore.get_patch(model).runtime
    step = runtime.step
    monkeypatch.setattr(
        runtime, "step", lambda layer, x, state, *a: sizes.append(state.size) or step(layer, x, state, *a)
    )
    with torch.no_grad():
        model(_images())
        assert len(fused) == 4, "every block keeps the fused attention"
        for layer in range(4):
            attn, y = model.blocks[layer].attn, normed[layer]
            b, n, _ = y.shape
            q, k, v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            logits = (attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-1, -2)
            if sizes[layer] is not None:
                logits = logits + sizes[layer].log()[:, None, None, :, 0]
            full = logits.softmax(-1)
            cls_attn, values = seen[layer]
            torch.testing.assert_close(cls_attn, full[:, :, 0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(values, v)
    assert sizes[0] is None and sizes[1] is not None


def test_importance_is_head_mean_attention_times_norm_of_head_mean_values():
    cls_attn = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]])  # [1, 2 heads, 3 tokens]
    values = torch.zeros(1, 2, 3, 2)
    values[0, 0, :, 0] = torch.tensor([3.0, 1.0, 0.0])
    values[0, 1, :, 0] = torch.tensor([1.0, 1.0, 0.0])
    values[0, 0, 2, 1], values[0, 1, 2, 1] = 4.0, 4.0
    # head means: attention [0.3, 0.45, 0.25]; values [(2, 0), (1, 0), (0, 4)] -> norms [2, 1, 4]
    torch.testing.assert_close(cis_module.class_importance(cls_attn, values), torch.tensor([[0.6, 0.45, 1.0]]))


def test_counts_and_schedule_are_tomes():
    model = timm.create_model("deit_small_patch16_224", depth=12).eval()
    tmcore.apply(model, "tomecis", r=13)
    with torch.no_grad(), tmcore.trace(model) as t:
        model(torch.randn(1, 3, 224, 224))
    assert t.token_counts == [197, 184, 171, 158, 145, 132, 119, 106, 93, 80, 67, 54, 41]
    torch.testing.assert_close(t.sizes.sum(), torch.tensor(197.0))
    assert tmcore.get_patch(model).reducer.prop_attn is True


def test_blocks_with_r_zero_need_nothing(vit):
    tmcore.apply(vit, "tomecis", r=[0, 4, 0, 2])
    assert tmcore.get_patch(vit).runtime.layer_needs == (
        frozenset(),
        frozenset({"keys", "cls_attn", "values"}),
        frozenset(),
        frozenset({"keys", "cls_attn", "values"}),
    )
    hooked = [bool(blk.attn.k_norm._forward_hooks) for blk in vit.blocks]
    assert hooked == [False, True, False, True]


def test_half_precision_autocast_runs(vit):
    tmcore.apply(vit.float(), "tomecis", r=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = vit(_images().float())
    assert torch.isfinite(out).all()


def test_a_model_without_a_class_token_is_refused():
    model = tiny_timm_models()["reg4_avgpool"]()
    with pytest.raises(
        UnsupportedModelError, match=r"'tomecis' weighs tokens by the class token's attention.*no class"
    ):
        tmcore.apply(model, "tomecis", r=4)
    assert tmcore.get_patch(model) is None


@pytest.mark.parametrize(
    "config, message",
    [
        ({"r": -1}, r"r=-1: must be an int >= 0"),
        ({"r": True}, r"r=True"),
        ({"r": "13"}, r"r='13'"),
        ({"r": 4, "prop_attn": "yes"}, r"prop_attn='yes'"),
        ({"r": 4, "prop_attn": 1}, r"prop_attn=1"),
        ({}, r"r is required"),
        ({"r": 4, "ratio": 0.9}, r"unknown config key 'ratio'"),
    ],
)
def test_bad_config_is_refused_naming_the_field(vit, config, message):
    with pytest.raises(InvalidConfigError, match=message):
        tmcore.apply(vit, "tomecis", **config)
    assert tmcore.get_patch(vit) is None


def test_the_cap_warns_at_the_callers_line(vit):
    with pytest.warns(ScheduleClampWarning, match="block 0: r=40 -> 32") as record:
        tmcore.apply(vit, "tomecis", r=40)
    assert record[0].filename == __file__


def test_save_and_load_round_trip(vit, tmp_path):
    tmcore.apply(vit, "tomecis", r=(4, -1), prop_attn=False)
    tmcore.save(vit, tmp_path / "cis.safetensors")
    fresh = tmcore.load(tiny_timm_models()["vit"](), tmp_path / "cis.safetensors")
    assert tmcore.get_patch(fresh).reducer.config == tmcore.get_patch(vit).reducer.config
    x = _images()
    with torch.no_grad():
        assert torch.equal(fresh(x), vit(x))
