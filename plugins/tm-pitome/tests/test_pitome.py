"""PiToMe's configuration surface: validation, per-family defaults, token counts, the text variant."""

from __future__ import annotations

import math

import pytest
import torch

import tmcore
from tm_pitome import PiToMe, pitome_match
from tm_pitome.reducer import PiToMeConfig
from tmcore import InvalidConfigError, ModelInfo, TmcoreError
from tmcore.state import LayerInputs, TokenState
from tmcore.testing import tiny_timm_models

# docs/algorithms.md 3.4: DeiT, 196 patches + CLS, 12 blocks
DEIT_COUNTS = {
    0.975: [197, 193, 189, 185, 181, 177, 173, 169, 165, 161, 157, 154, 151],
    0.95: [197, 188, 179, 171, 163, 155, 148, 141, 134, 128, 122, 116, 111],
    0.925: [197, 183, 170, 158, 147, 137, 127, 118, 110, 102, 95, 88, 82],
    0.9: [197, 178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66, 60],
    0.875: [197, 173, 152, 134, 118, 104, 92, 81, 71, 63, 56, 50, 44],
}


@pytest.fixture
def vit():
    return tiny_timm_models()["vit"]()


def test_deit_token_counts_equal_the_table():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=24, depth=12, num_heads=2, num_classes=3).eval()
    images = torch.randn(2, 3, 224, 224)
    for ratio, expected in DEIT_COUNTS.items():
        tmcore.apply(model, "pitome", ratio=ratio, replace=True)
        with torch.no_grad(), tmcore.trace(model) as t:
            model(images)
        assert t.token_counts == expected, ratio
        assert tmcore.get_patch(model).reducer.token_counts(197) == expected
        assert t.sizes.shape == (2, expected[-1], 1)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"ratio": 0.3}, r"ratio=0\.3: must be a finite number in \[0\.5, 1\].*undefined below 0\.5"),
        ({"ratio": 1.5}, r"ratio=1\.5: must be a finite number in \[0\.5, 1\]"),
        ({"ratio": True}, r"ratio=True: must be"),
        ({"ratio": "0.9"}, r"ratio='0\.9': must be"),
        ({"ratio": [0.9, 0.2]}, r"ratio=\[0\.9, 0\.2\]: must be"),
        (
            {"ratio": 0.9, "variant": "tome"},
            r"variant='tome': must be one of 'pitome', 'pitome_bsm', 'pitome_text', 'bsm'",
        ),
        ({"ratio": 0.9, "variant": ["pitome", "tome"]}, r"variant=\['pitome', 'tome'\]: must be one of"),
        ({"ratio": 0.9, "margin": 1.5}, r"margin=1\.5: must be a finite number in \[-1, 1\].*\(start, end\)"),
        ({"ratio": 0.9, "margin": (0.5, 0.1, 0.0)}, r"margin=\(0\.5, 0\.1, 0\.0\): must be"),
        ({"ratio": 0.9, "margin": float("nan")}, r"margin=nan: must be"),
        ({"ratio": 0.9, "alpha": 0}, r"alpha=0: must be a finite number > 0"),
        ({"ratio": 0.9, "prop_attn": "yes"}, r"prop_attn='yes': must be True or False"),
        ({"ratio": 0.9, "r": 4}, r"unknown config key 'r' \(value 4\)"),
        ({}, r"ratio is required"),
    ],
)
def test_bad_config_is_refused_naming_field_value_and_allowed(vit, config, message):
    with pytest.raises(InvalidConfigError, match=message) as err:
        tmcore.apply(vit, "pitome", **config)
    assert isinstance(err.value, TmcoreError)
    assert tmcore.get_patch(vit) is None


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"margin": [0.5, 0.4, 0.3]},
            r"margin=\[0\.5, 0\.4, 0\.3\] has 3 entries for a model with 4 blocks; "
            r"allowed: one value for every block, or a list of exactly 4 entries",
        ),
        ({"variant": ["pitome"] * 5}, r"variant=\['pitome', .* has 5 entries for a model with 4 blocks"),
        ({"ratio": [0.9] * 3}, r"ratio=\[0\.9, 0\.9, 0\.9\] has 3 entries for a model with 4 blocks"),
        (
            {"variant": "pitome_text", "margin": 1.0},
            r"margin: block 0 uses 'pitome_text' with margin 1\.0; allowed: margin < 1",
        ),
    ],
)
def test_model_dependent_checks_at_apply(vit, config, message):
    with pytest.raises(InvalidConfigError, match=message):
        tmcore.apply(vit, "pitome", **{"ratio": 0.9, **config})
    assert tmcore.get_patch(vit) is None


def _reducer(info: ModelInfo, **config) -> PiToMe:
    return PiToMe(PiToMeConfig(**config), info)


VISION = ModelInfo(family="timm.vit", num_layers=12, num_tokens=197, num_protected=1)


def test_defaults_follow_the_original_per_family():
    deit = _reducer(VISION, ratio=0.9)
    assert deit.variants == ("pitome_bsm",) * 6 + ("pitome",) * 6
    assert deit.margins == tuple(0.75 - 0.75 * (i / 12) for i in range(12))
    assert deit.margins[0] == 0.75 and deit.margins[-1] == 0.0625
    assert deit.ratios == (0.9,) * 12
    assert deit.prop_attn is False and deit.size_weighted is True

    mae = _reducer(VISION.model_copy(update={"mae": True, "pool": "avg", "num_layers": 7}), ratio=0.9)
    assert mae.variants == ("pitome",) * 4 + ("pitome_bsm",) * 3  # ceil(7 / 2) = 4

    text = _reducer(VISION.model_copy(update={"modality": "text", "family": "bert"}), ratio=0.6)
    assert text.variants == ("pitome_text",) * 12
    assert text.ratios == (0.6,) * 3 + (1.0,) * 9  # only the first three layers reduce
    assert text.margins == tuple(0.9 - 0.25 * (i / 12) for i in range(12))
    assert text.size_weighted is False


def test_explicit_settings_override_the_defaults():
    red = _reducer(
        VISION.model_copy(update={"num_layers": 4}),
        ratio=[0.9, 1.0, 0.5, 0.8],
        margin=(0.6, 0.2),
        variant=["pitome", "pitome_text", "pitome_bsm", "pitome"],
        prop_attn=True,
        size_weighted=False,
    )
    assert red.ratios == (0.9, 1.0, 0.5, 0.8)
    assert red.margins == pytest.approx([0.6, 0.5, 0.4, 0.3])
    assert red.variants == ("pitome", "pitome_text", "pitome_bsm", "pitome")
    assert red.prop_attn is True and red.size_weighted is False
    assert _reducer(VISION, ratio=0.9, margin=0.25).margins == (0.25,) * 12
    text = _reducer(VISION.model_copy(update={"modality": "text", "num_layers": 4}), ratio=[0.7] * 4)
    assert text.ratios == (0.7,) * 4


def test_mae_weights_invert_the_layer_order(vit):
    vit.pretrained_cfg = {"tag": "mae"}
    tmcore.apply(vit, "pitome", ratio=0.9)
    assert tmcore.get_patch(vit).reducer.variants == ("pitome", "pitome", "pitome_bsm", "pitome_bsm")


def _layer(reducer: PiToMe, layer: int, keys4d: torch.Tensor, x: torch.Tensor, size: torch.Tensor | None):
    """One reduction step as an adapter runs it: score -> match -> reduce."""
    state = TokenState(num_protected=reducer.info.num_protected, num_input=x.shape[1], prop_attn=False, trace=None)
    state.size = size
    plan = reducer.match(layer, reducer.score(layer, LayerInputs({"k": keys4d}, None, 1.0), state), state)
    if plan is None:
        return None, x, size
    out, new_size = reducer.reduce(x, plan, state)
    return plan, out, new_size


def test_text_variant_on_a_text_model():
    """The text defaults: Gaussian energy, energy-halves split, first three layers, plain group mean."""
    info = ModelInfo(family="bert", num_layers=6, num_tokens=24, num_protected=1, modality="text")
    red = _reducer(info, ratio=0.7)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 8, generator=gen, dtype=torch.float64)
    size = None
    counts = [24]
    for layer in range(6):
        keys4d = torch.randn(2, 3, x.shape[1], 4, generator=gen, dtype=torch.float64)
        plan, y, new_size = _layer(red, layer, keys4d, x, size)
        if plan is not None:
            margin = 0.9 - 0.25 * (layer / 6)
            expected = pitome_match(keys4d.mean(1), plan.src.shape[1], margin, "pitome_text", num_protected=1)
            assert torch.equal(plan.keep, expected.keep) and torch.equal(plan.src, expected.src)
            assert torch.equal(plan.src_dst, expected.src_dst)
            # features: plain mean of the group (the original resets sizes); sizes still add up
            torch.testing.assert_close(y, tmcore.merge_weighted(x, plan)[0], rtol=0, atol=0)
            assert new_size.sum().item() == 2 * 24
        x, size = y, new_size
        counts.append(x.shape[1])
    expected = [24]
    for layer in range(6):
        t = expected[-1] - 1
        expected.append(expected[-1] - (math.floor(t - t * 0.7) if layer < 3 else 0))
    assert counts == expected == red.token_counts(24) == [24, 18, 13, 10, 10, 10, 10]
    assert size is not None and not torch.equal(size, torch.ones_like(size))  # sizes were carried


def test_size_weighted_text_on_request():
    info = ModelInfo(family="bert", num_layers=2, num_tokens=16, num_protected=1, modality="text")
    red = _reducer(info, ratio=0.6, size_weighted=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 5, (1, 16, 1), generator=gen).double()
    plan, y, new_size = _layer(red, 0, torch.randn(1, 2, 16, 4, generator=gen, dtype=torch.float64), x, size)
    ref_y, ref_size = tmcore.merge_weighted(x, plan, size)
    assert torch.equal(y, ref_y) and torch.equal(new_size, ref_size)


def test_a_block_with_too_few_tokens_is_skipped():
    """r = floor(T - ratio * T) = 0 leaves the block alone (the original's pitome would fail on an
    empty [0, 0] max, its pitome_bsm would only re-order the tokens)."""
    info = ModelInfo(family="timm.vit", num_layers=1, num_tokens=11, num_protected=1)
    red = _reducer(info, ratio=0.95)
    x = torch.randn(1, 11, 4)
    plan, y, _ = _layer(red, 0, torch.randn(1, 2, 11, 4), x, None)
    assert plan is None and y is x
    assert red.token_counts(11) == [11, 11]


def test_ratio_one_and_unreduced_blocks_compute_nothing():
    red = _reducer(VISION.model_copy(update={"num_layers": 2}), ratio=[1.0, 0.9])
    state = TokenState(num_protected=1, num_input=197, prop_attn=False, trace=None)
    assert red.score(0, LayerInputs({}, None, 1.0), state) is None  # keys never read


def test_save_and_load_round_trip(vit, tmp_path):
    tmcore.apply(vit, "pitome", ratio=0.8, margin=(0.6, 0.1), variant=["pitome", "pitome_bsm"] * 2, alpha=0.5)
    tmcore.save(vit, tmp_path / "pitome.safetensors")
    fresh = tiny_timm_models()["vit"]()
    tmcore.load(fresh, tmp_path / "pitome.safetensors")
    red = tmcore.get_patch(fresh).reducer
    assert red.config == tmcore.get_patch(vit).reducer.config
    assert red.config.margin == (0.6, 0.1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(fresh(x), vit(x))


def test_trace_unmerge_and_source_map(vit):
    tmcore.apply(vit, "pitome", ratio=0.7)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad(), tmcore.trace(vit) as t:
        vit(x)
    n0, m = t.token_counts[0], t.token_counts[-1]
    assert t.source.shape == (2, n0) and t.source_matrix().shape == (2, m, n0)
    full = t.unmerge(torch.arange(m, dtype=torch.float64).expand(2, m).unsqueeze(-1))
    assert torch.equal(full[..., 0].long(), t.source)  # each input position gets its group's slot
    torch.testing.assert_close(t.source_matrix().sum(2).double(), t.sizes.squeeze(-1))
