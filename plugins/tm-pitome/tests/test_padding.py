"""Padded batches: every sample is reduced exactly as it is alone, unpadded (tokens, order,
sizes, counts), for each procedure, prefix length and very short samples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tm_pitome import PiToMe, pitome_match
from tm_pitome.merge import padded_bounds, removed
from tm_pitome.reducer import CLIP_FAMILY, PiToMeConfig
from tmcore import ModelInfo
from tmcore.testing.padding import (
    assert_blocks_equal_samples,
    assert_padded_equals_unpadded,
    block_matcher,
    right_padding,
)
from tmcore.testing.strategies import padded_batches

PROCEDURES = ["pitome", "pitome_bsm", "pitome_text", "bsm"]


def _reducer(p: int, layers: int = 1, **config) -> PiToMe:
    info = ModelInfo(family="test", num_layers=layers, num_tokens=24, num_protected=p, class_token=p > 0)
    return PiToMe(PiToMeConfig(**config), info)


@pytest.mark.parametrize("variant", PROCEDURES)
@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.9])
def test_short_samples_equal_their_unpadded_plans(variant, p, ratio):
    gen = torch.Generator().manual_seed(p)
    x = torch.randn(6, 21, 5, generator=gen, dtype=torch.float64)
    valid = right_padding([21, 13, max(p, 1), p + 1, p + 2, p + 3], 21)
    red = _reducer(p, ratio=ratio, variant=variant, margin=0.5)
    assert_padded_equals_unpadded(block_matcher(red, keys_only=True), x, valid)


@settings(max_examples=60, deadline=None)
@given(
    variant=st.sampled_from(PROCEDURES),
    p=st.integers(0, 2),
    ratio=st.floats(0.5, 0.99),
    margin=st.floats(-0.5, 0.9),
    data=st.data(),
)
def test_padded_equals_unpadded(variant, p, ratio, margin, data):
    n = data.draw(st.integers(p + 1, 30), label="n")
    x, valid, size = data.draw(padded_batches(n, max(p, 1)), label="batch")
    red = _reducer(p, ratio=ratio, variant=variant, margin=margin, size_weighted=True)
    assert_padded_equals_unpadded(block_matcher(red, keys_only=True), x, valid, size)


def test_plan_size_is_static_and_bounds_every_sample():
    """The padded plan has ``N - removed(T)`` slots however short the samples are (no host sync),
    and that bounds every sample's count: ``T_i - r(T_i)`` never decreases with ``T_i``."""
    for variant in PROCEDURES:
        for p in (0, 1, 2):
            for ratio in (0.5, 0.55, 0.7, 0.9, 0.925, 0.975, 0.999):
                for t in range(0, 300, 7):
                    width, slots = padded_bounds(variant, t, ratio, p)
                    assert slots == p + t - removed(variant, t, ratio, p)
                    assert width == max(removed(variant, s, ratio, p) for s in range(t + 1))
    x = torch.randn(3, 25, 4, dtype=torch.float64)
    valid = right_padding([4, 3, 2], 25)
    plan = block_matcher(_reducer(1, ratio=0.6, variant="pitome"), keys_only=True)(x, valid)
    assert plan.num_out == 25 - removed("pitome", 24, 0.6, 1)
    assert plan.valid is not None and plan.valid.sum(1).tolist() == [3, 3, 2]  # 1 + ceil(0.6 T_i)


@pytest.mark.parametrize("p", [0, 1, 2])
def test_every_block_equals_the_samples_alone(p):
    """Four blocks, one of each procedure: features, sizes and per-sample token counts (also
    `PiToMe.token_counts` on the real lengths) equal the unpadded runs."""
    red = _reducer(p, layers=4, ratio=0.7, variant=["bsm", "pitome_bsm", "pitome", "pitome_text"], margin=0.4)
    lengths = [24, 17, 9, p + 3, p + 1]
    x = torch.randn(len(lengths), 24, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    state, counts = assert_blocks_equal_samples(red, x, lengths)
    assert state.valid is not None
    expected = red.token_counts(torch.tensor(lengths))
    assert [c.tolist() for c in counts] == [e.tolist() for e in expected]
    assert [red.token_counts(n) for n in lengths] == [[int(c[i]) for c in counts] for i in range(len(lengths))]


def test_bsm_is_tome_matching_on_a_ratio_of_all_tokens():
    """``bsm`` (the original's HF-CLIP early layers): ``r = floor(N - N ratio)`` with the prefix
    counted, ToMe's matching; capped at half of the unprotected tokens."""
    red = _reducer(1, layers=1, ratio=0.9, variant="bsm")
    assert red.token_counts(50) == [50, 45]  # floor(50 - 45.0) = 5 (T = 49 alone would give 4)
    x = torch.randn(2, 50, 4, dtype=torch.float64)
    plan = block_matcher(red, keys_only=True)(x, None)
    expected = pitome_match(x, 5, 0.0, "bsm", num_protected=1)
    assert torch.equal(plan.keep, expected.keep) and torch.equal(plan.src_dst, expected.src_dst)
    assert _reducer(1, ratio=0.5, variant="bsm").token_counts(10) == [10, 6]  # r = 5 capped at 9 // 2


def test_clip_defaults_follow_clip_hf():
    info = ModelInfo(family=CLIP_FAMILY, num_layers=24, num_tokens=577, num_protected=1, class_token=True)
    red = PiToMe(PiToMeConfig(ratio=0.9), info)
    assert red.position == "layer"
    assert red.variants == ("bsm",) * 13 + ("pitome",) * 11
    assert red.margins == tuple(0.9 - 0.9 * (i / 24) for i in range(24))
    assert red.size_weighted is False and red.prop_attn is False
    assert red.token_counts(577)[:3] == [577, 520, 468]  # floor(577 - 519.3) = 57, floor(520 - 468) = 52
    vit_b = PiToMe(PiToMeConfig(ratio=0.9), info.model_copy(update={"num_layers": 12}))
    assert vit_b.variants == ("bsm",) * 12  # the original's index <= 12, as written
    custom = PiToMe(PiToMeConfig(ratio=0.9, variant="pitome", size_weighted=True), info)
    assert custom.variants == ("pitome",) * 24 and custom.size_weighted is True and custom.position == "layer"
    assert _reducer(1, ratio=0.9).position == "attention"
