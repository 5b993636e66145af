"""PPT beyond the conformance suite: the published counts, the two pure settings (all pooling is
ToMe at the listed blocks, all pruning keeps the most significant tokens), mixed batches equal
their images run alone, and configuration errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import tm_ppt.reducer as ppt_module
import tmcore
from tmcore import InvalidConfigError, ScheduleClampWarning, UnsupportedModelError
from tmcore.cli import parse_reducer_spec
from tmcore.testing import tiny_timm_models

timm = pytest.importorskip("timm")


@pytest.fixture
def vit():
    return tiny_timm_models()["vit"]()


def _images(batch=4, size=32, seed=3):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(model, x):
    with torch.no_grad(), tmcore.trace(model) as t:
        out = model(x)
    return out, t


def _variances(monkeypatch, model, x, **config):
    """Per-image significance variances at each reducing block, as the reducer computes them."""
    seen = []
    real = ppt_module.significance

    def recording(*args):
        sig = real(*args)
        seen.append(sig.var(dim=1))
        return sig

    monkeypatch.setattr(ppt_module, "significance", recording)
    tmcore.apply(model, "ppt", replace=True, **config)
    _run(model, x)
    monkeypatch.setattr(ppt_module, "significance", real)
    return seen


def test_counts_on_deit_small_at_the_defaults():
    model = timm.create_model("deit_small_patch16_224").eval()
    with pytest.warns(ScheduleClampWarning, match=r"block 9: r=50 -> 48") as record:
        tmcore.apply(model, "ppt")
    assert record[0].filename == __file__, "the warning points at the caller's apply line"
    _, t = _run(model, torch.randn(2, 3, 224, 224))
    assert t.token_counts == [197] * 4 + [147] * 3 + [97] * 3 + [49] * 3
    assert all(type(c) is int for c in t.token_counts)
    assert tmcore.get_patch(model).runtime.layer_needs == tuple(
        frozenset({"keys", "cls_attn", "values"}) if i in (3, 6, 9) else frozenset() for i in range(12)
    )


def test_threshold_inf_pools_every_image_and_is_tome_at_the_listed_blocks():
    x = _images()
    ppt = tmcore.apply(tiny_timm_models()["deit_distilled"](), "ppt", r=[9, 5], layers=[1, 3], threshold=math.inf)
    out, t = _run(ppt, x)
    assert tmcore.get_patch(ppt).runtime.layer_needs[1] == {"keys"}, "all-pooling needs no class attention"
    tome = tmcore.apply(tiny_timm_models()["deit_distilled"](), "tome", r=[0, 9, 0, 5])
    ref, ref_t = _run(tome, x)
    assert torch.equal(out, ref)
    assert torch.equal(t.sizes, ref_t.sizes) and torch.equal(t.source, ref_t.source)
    assert t.token_counts == ref_t.token_counts == [66, 66, 57, 57, 52]
    # without proportional attention pooling averages plainly, but sizes are still summed
    tmcore.apply(ppt, "ppt", replace=True, r=[9, 5], layers=[1, 3], threshold=math.inf, prop_attn=False)
    _, t = _run(ppt, x)
    torch.testing.assert_close(t.sizes.sum(1), torch.full((4, 1), 66.0, dtype=torch.float64))


def test_threshold_inf_at_the_defaults_is_tome_r50_at_blocks_3_6_9():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    models = [timm.create_model("deit_small_patch16_224").eval() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScheduleClampWarning)  # block 9: 50 -> 48, in both
        tmcore.apply(models[0], "ppt", threshold=math.inf)
        tmcore.apply(models[1], "tome", r=[0, 0, 0, 50, 0, 0, 50, 0, 0, 50])
    (out, t), (ref, ref_t) = (_run(m, x) for m in models)
    assert torch.equal(out, ref) and torch.equal(t.source, ref_t.source)
    assert t.token_counts == ref_t.token_counts == [197] * 4 + [147] * 3 + [97] * 3 + [49] * 3


@pytest.mark.parametrize("threshold", [0.0, -math.inf, -1.0])
def test_threshold_at_most_zero_prunes_every_image(monkeypatch, threshold):
    """Every image keeps its protected prefix, then its most significant tokens in descending
    order; pruned tokens take their sizes with them, so every kept token still has size 1."""
    model = tiny_timm_models()["deit_distilled"]()
    x = _images()
    [var] = _variances(monkeypatch, model, x, r=12, layers=[2], threshold=1.0)
    assert (var < 1.0).all()  # at threshold 1 these images would all pool ...
    seen = []
    real = ppt_module.significance
    monkeypatch.setattr(ppt_module, "significance", lambda *a: seen.append(real(*a)) or seen[-1])
    tmcore.apply(model, "ppt", replace=True, r=12, layers=[2], threshold=threshold)
    assert tmcore.get_patch(model).runtime.layer_needs[2] == {"cls_attn", "values"}, "all-pruning needs no keys"
    _, t = _run(model, x)  # ... and at <= 0 they all prune
    assert t.token_counts == [66, 66, 66, 54, 54]
    assert torch.equal(t.sizes, torch.ones(4, 54, 1, dtype=torch.float64))
    assert ((t.source >= 0).sum(1) == 54).all() and ((t.source == -1).sum(1) == 12).all()
    sig = seen[0]  # [B, 64] patch tokens
    kept = sig.argsort(dim=1, descending=True)[:, :52] + 2
    slot_of_input = t.source  # after the last (only) reduction: input -> output slot
    assert torch.equal(slot_of_input[:, :2], torch.tensor([[0, 1]] * 4)), "class and distillation token stay"
    assert torch.equal(slot_of_input.gather(1, kept), torch.arange(2, 54).expand(4, 52))


def test_a_mixed_batch_equals_its_images_run_alone(monkeypatch):
    """Logits, sizes and source map of each image are those of a batch of one, though some
    images pool and others prune in the same block (one fixed-shape plan, no sub-batches)."""
    model = tiny_timm_models()["vit"]()
    x = _images(6)
    first, second = _variances(monkeypatch, model, x, r=10, layers=[1, 2], threshold=1.0)
    threshold = float(first.sort().values[2:4].mean())  # three images pool, three prune in block 1
    pooled = first < threshold
    assert 0 < int(pooled.sum()) < len(x)
    tmcore.apply(model, "ppt", replace=True, r=10, layers=[1, 2], threshold=threshold)
    out, t = _run(model, x)
    lost = t.sizes.sum(1).squeeze(-1) < 65
    assert torch.equal(lost, ~pooled | (second >= threshold)), "sizes show which images pruned"
    assert all(type(c) is int for c in t.token_counts)
    for i in range(len(x)):
        one, ti = _run(model, x[i : i + 1])
        torch.testing.assert_close(one, out[i : i + 1], rtol=1e-10, atol=1e-10)
        assert torch.equal(ti.sizes, t.sizes[i : i + 1]) and torch.equal(ti.source, t.source[i : i + 1])


def test_only_the_listed_blocks_reduce_and_need_inputs(vit):
    tmcore.apply(vit, "ppt", r=5, layers=[2], threshold=1e-3)
    needs = tmcore.get_patch(vit).runtime.layer_needs
    assert needs == (frozenset(), frozenset(), frozenset({"keys", "cls_attn", "values"}), frozenset())
    assert [bool(b.attn.qkv._forward_hooks) for b in vit.blocks] == [False, False, True, False]
    _, t = _run(vit, _images())
    assert t.token_counts == [65, 65, 65, 60, 60]


def test_r_list_pairs_with_layers_and_r_zero_is_the_identity(vit):
    tmcore.apply(vit, "ppt", r=[3, 7], layers=[3, 1])
    _, t = _run(vit, _images())
    assert t.token_counts == [65, 65, 58, 58, 55]
    x = _images()
    with torch.no_grad():
        ref = tmcore.remove(vit)(x)
        assert torch.equal(tmcore.apply(vit, "ppt", r=0, layers=[0, 1, 2, 3])(x), ref)


def test_a_model_without_a_class_token_is_refused():
    model = tiny_timm_models()["reg4_avgpool"]()
    with pytest.raises(UnsupportedModelError, match=r"'ppt' .*no class token"):
        tmcore.apply(model, "ppt", r=4, layers=[1])


@pytest.mark.parametrize(
    "config, message",
    [
        ({"layers": [1, 2, 12]}, r"layers=\[1, 2, 12\]: block\(s\) \[12\] out of range for a model with 4 blocks"),
        ({}, r"layers=\[3, 6, 9\]: block\(s\) \[6, 9\] out of range for a model with 4 blocks; allowed: 0 to 3"),
        ({"layers": [1, 1]}, r"layers=\[1, 1\]: must be a list of distinct .*; block\(s\) \[1\] listed more than once"),
        ({"layers": [1.0, 2]}, r"layers=\[1.0, 2\]: must be a list of distinct 0-based block indices"),
        ({"layers": [True]}, r"layers=\[True\]: must be a list"),
        ({"layers": [-1]}, r"layers=\[-1\]: must be a list"),
        ({"layers": "1,2"}, r"layers='1,2': must be a list"),
        ({"layers": [1], "r": -1}, r"r=-1: must be an int >= 0"),
        ({"layers": [1], "r": True}, r"r=True: must be an int"),
        ({"layers": [1], "r": 2.0}, r"r=2.0: must be an int"),
        ({"layers": [1], "r": "5"}, r"r='5': must be an int"),
        (
            {"layers": [1, 2], "r": [4]},
            r"r=\[4\] has 1 entries for layers=\[1, 2\]; allowed: one value for every listed block, or a list of "
            r"exactly 2",
        ),
        ({"layers": [1], "threshold": math.nan}, r"threshold=nan: must be a number in \[-inf, inf\], not NaN"),
        ({"layers": [1], "threshold": "0.1"}, r"threshold='0.1': must be a number"),
        ({"layers": [1], "threshold": True}, r"threshold=True: must be a number"),
        ({"layers": [1], "threshold": None}, r"threshold=None: must be a number"),
        ({"layers": [1], "prop_attn": "yes"}, r"prop_attn='yes'"),
        ({"layers": [1], "rr": 3}, r"unknown config key 'rr'"),
    ],
)
def test_bad_config_is_refused_naming_the_field(vit, config, message):
    with pytest.raises(InvalidConfigError, match=message) as err:
        tmcore.apply(vit, "ppt", **config)
    assert "ppt" in str(err.value)
    assert tmcore.get_patch(vit) is None


def test_save_and_load_round_trip_infinite_thresholds(vit, tmp_path):
    x = _images()
    for threshold in (math.inf, -math.inf):
        tmcore.apply(vit, "ppt", replace=True, r=[4, 6], layers=[0, 2], threshold=threshold)
        tmcore.save(vit, tmp_path / "ppt.safetensors")
        fresh = tmcore.load(tiny_timm_models()["vit"](), tmp_path / "ppt.safetensors")
        assert tmcore.get_patch(fresh).reducer.config.threshold == threshold
        with torch.no_grad():
            assert torch.equal(fresh(x), vit(x))


def test_cli_spec_takes_infinite_thresholds():
    specs = parse_reducer_spec("ppt:threshold=0,7e-5,inf,-inf")
    assert [c["threshold"] for _, c in specs] == [0, 7e-5, math.inf, -math.inf]


def test_no_warning_when_nothing_is_capped(vit):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tmcore.apply(vit, "ppt", r=20, layers=[0, 1])
