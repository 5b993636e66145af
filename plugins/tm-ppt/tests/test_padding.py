"""Padded batches: every sample is reduced exactly as it is alone, unpadded: significance and its
variance over the sample's real tokens, the pool / prune choice, tokens, order, sizes, counts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from tm_ppt import PPT
from tm_ppt.reducer import masked_variance
from tmcore import ScheduleClampWarning
from tmcore.testing.padding import (
    assert_blocks_equal_samples,
    assert_padded_equals_unpadded,
    block_matcher,
    layer_inputs,
    make_reducer,
    padded_state,
    right_padding,
)
from tmcore.testing.strategies import padded_batches

# short samples run alone cap r at half their tokens, with a warning each time
pytestmark = pytest.mark.filterwarnings("ignore", category=ScheduleClampWarning)


def _reducer(p: int, layers: int = 1, tokens: int = 24, **config) -> PPT:
    return make_reducer("ppt", p, layers, tokens, class_token=True, layers=list(range(layers)), **config)


def _significance_alone(red: PPT, x: Tensor) -> Tensor:
    state = padded_state(red, x, None)
    return red.score(0, layer_inputs(red, 0, x, state), state).importance[0]


def test_masked_variance_is_the_variance_of_the_real_entries():
    values = torch.randn(4, 9, dtype=torch.float64)
    valid = right_padding([9, 5, 2, 1], 9)
    out = masked_variance(values, valid)
    for i, n_i in enumerate([9, 5, 2]):
        torch.testing.assert_close(out[i], values[i, :n_i].var(), rtol=1e-12, atol=1e-15)
    assert out[3].isnan()  # one entry: NaN like Tensor.var, so that sample prunes (and removes none)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("threshold", ["pool", "prune", "mixed"])
def test_short_samples_equal_their_unpadded_plans(p, threshold):
    gen = torch.Generator().manual_seed(p)
    x = torch.randn(7, 22, 6, generator=gen, dtype=torch.float64)
    lengths = [22, 17, 13, p, p + 1, p + 2, p + 3]
    valid = right_padding(lengths, 22)
    if threshold == "mixed":
        # halfway between sample 2's variance alone and the variance it would have with its
        # padding counted (as zeros): only the variance over real tokens takes its branch alone
        sig = _significance_alone(_reducer(p, tokens=22, r=5), x[2:3, :13])
        value = (float(sig.var()) + float(torch.cat([sig, sig.new_zeros(22 - 13)]).var())) / 2
    else:
        value = math.inf if threshold == "pool" else 0.0
    red = _reducer(p, tokens=22, r=5, threshold=value)
    plan = block_matcher(red)(x, valid)
    pooled = (plan.src_dst >= 0).any(1)[:3].tolist()
    assert pooled == {"pool": [True] * 3, "prune": [False] * 3}.get(threshold, pooled)
    if threshold == "mixed":
        assert any(pooled) and not all(pooled)
    assert_padded_equals_unpadded(block_matcher(red), x, valid)


@settings(max_examples=40, deadline=None)
@given(
    p=st.integers(1, 2),
    threshold=st.sampled_from([0.0, 1e-3, 5e-3, 2e-2, math.inf]),
    prop_attn=st.booleans(),
    data=st.data(),
)
def test_padded_equals_unpadded(p, threshold, prop_attn, data):
    n = data.draw(st.integers(p + 1, 26), label="n")
    r = data.draw(st.integers(0, max((n - p) // 2, 0)), label="r")
    x, valid, size = data.draw(padded_batches(n, p), label="batch")
    red = _reducer(p, tokens=n, r=r, threshold=threshold, prop_attn=prop_attn)
    assert_padded_equals_unpadded(block_matcher(red), x, valid, size)


@pytest.mark.parametrize("p", [1, 2])
def test_every_block_equals_the_samples_alone(p):
    red = _reducer(p, layers=3, r=[6, 4, 3], threshold=2e-3)
    x = torch.randn(5, 24, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert_blocks_equal_samples(red, x, [24, 15, 8, p + 3, p + 1])
