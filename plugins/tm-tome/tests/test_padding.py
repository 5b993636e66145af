"""Padded batches: every sample is reduced exactly as it is alone, unpadded (tokens, order,
sizes, counts), including very short samples and the schedule's per-length cap."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tm_tome import ToMe
from tmcore import ScheduleClampWarning
from tmcore.testing.padding import (
    assert_blocks_equal_samples,
    assert_padded_equals_unpadded,
    block_matcher,
    make_reducer,
    right_padding,
)
from tmcore.testing.strategies import padded_batches

# short samples run alone cap r at half their tokens, with a warning each time
pytestmark = pytest.mark.filterwarnings("ignore", category=ScheduleClampWarning)


def _reducer(p: int, layers: int = 1, tokens: int = 24, **config) -> ToMe:
    return make_reducer("tome", p, layers, tokens, **config)


@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("r", [1, 4, 10])
def test_short_samples_equal_their_unpadded_plans(p, r):
    gen = torch.Generator().manual_seed(r)
    x = torch.randn(6, 22, 5, generator=gen, dtype=torch.float64)
    valid = right_padding([22, 13, max(p, 1), p + 1, p + 2, p + 3], 22)
    assert_padded_equals_unpadded(block_matcher(_reducer(p, tokens=22, r=r), keys_only=True), x, valid)


@settings(max_examples=60, deadline=None)
@given(p=st.integers(0, 2), data=st.data())
def test_padded_equals_unpadded(p, data):
    n = data.draw(st.integers(p + 1, 30), label="n")
    r = data.draw(st.integers(0, max((n - p) // 2, 0)), label="r")
    x, valid, size = data.draw(padded_batches(n, max(p, 1)), label="batch")
    match = block_matcher(_reducer(p, tokens=n, r=r), keys_only=True)
    assert_padded_equals_unpadded(match, x, valid, size)


@pytest.mark.parametrize("p", [0, 1, 2])
def test_every_block_equals_the_samples_alone(p):
    """Four blocks whose ``r`` the schedule caps differently for each length: features, sizes and
    per-sample counts equal the unpadded runs."""
    red = _reducer(p, layers=4, r=[6, 5, 4, 3])
    x = torch.randn(5, 24, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    state, _ = assert_blocks_equal_samples(red, x, [24, 15, 8, p + 3, p + 1])
    assert state.valid is not None
