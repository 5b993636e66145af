"""Padded batches: every sample is reduced exactly as it is alone, unpadded (tokens, order,
class-importance-weighted features, sizes, counts), including very short samples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tm_tomecis import ToMeCIS
from tmcore import ScheduleClampWarning
from tmcore.state import TokenState
from tmcore.testing.padding import (
    assert_blocks_equal_samples,
    assert_padded_equals_unpadded,
    block_matcher,
    layer_inputs,
    make_reducer,
    right_padding,
)
from tmcore.testing.strategies import padded_batches

# short samples run alone cap r at half their tokens, with a warning each time
pytestmark = pytest.mark.filterwarnings("ignore", category=ScheduleClampWarning)


def _reducer(p: int, layers: int = 1, tokens: int = 24, **config) -> ToMeCIS:
    return make_reducer("tomecis", p, layers, tokens, class_token=True, **config)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("r", [1, 4, 10])
def test_short_samples_equal_their_unpadded_plans(p, r):
    gen = torch.Generator().manual_seed(r)
    x = torch.randn(6, 22, 6, generator=gen, dtype=torch.float64)
    valid = right_padding([22, 13, p, p + 1, p + 2, p + 3], 22)
    red = _reducer(p, tokens=22, r=r)
    plan = block_matcher(red)(x, valid)
    assert plan.weight is not None
    assert_padded_equals_unpadded(block_matcher(red), x, valid)


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 2), data=st.data())
def test_padded_equals_unpadded(p, data):
    n = data.draw(st.integers(p + 1, 26), label="n")
    r = data.draw(st.integers(0, max((n - p) // 2, 0)), label="r")
    x, valid, size = data.draw(padded_batches(n, p), label="batch")
    assert_padded_equals_unpadded(block_matcher(_reducer(p, tokens=n, r=r)), x, valid, size)


def test_padding_gets_no_class_importance():
    x = torch.randn(2, 10, 4, dtype=torch.float64)
    valid = right_padding([10, 4], 10)
    red = _reducer(1, tokens=10, r=2)
    state = TokenState(1, 10, prop_attn=True, trace=None)
    state.valid = valid
    scores = red.score(0, layer_inputs(red, 0, x, state), state)
    assert (scores.importance[~valid] == 0).all() and (scores.importance[valid] > 0).all()


@pytest.mark.parametrize("p", [1, 2])
def test_every_block_equals_the_samples_alone(p):
    red = _reducer(p, layers=3, r=[6, 4, 3])
    x = torch.randn(5, 24, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert_blocks_equal_samples(red, x, [24, 15, 8, p + 3, p + 1])
