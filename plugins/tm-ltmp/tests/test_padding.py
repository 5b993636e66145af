"""A padded input (block 0's padding mask): every sample is reduced exactly as it is alone,
unpadded, at inference (importance over its real queries, no padding in any match, same tokens,
order and sizes) and in training (soft masks, real tokens kept first)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tm_ltmp import LTMP
from tmcore.testing.padding import (
    assert_blocks_equal_samples,
    assert_padded_equals_unpadded,
    block_matcher,
    make_reducer,
    right_padding,
)
from tmcore.testing.strategies import padded_batches

MODES = ["merge_prune", "prune_merge", "merge", "prune"]


def _reducer(p: int, layers: int = 1, **config) -> LTMP:
    return make_reducer("ltmp", p, layers, pool="token" if p else "avg", **config)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [0, 1, 2])
def test_short_samples_equal_their_unpadded_plans(mode, p):
    gen = torch.Generator().manual_seed(p)
    x = torch.randn(6, 22, 6, generator=gen, dtype=torch.float64)
    valid = right_padding([22, 13, max(p, 1), p + 1, p + 2, p + 3], 22)
    red = _reducer(p, mode=mode, merge_threshold=0.2, prune_threshold=0.05)
    plan = block_matcher(red)(x, valid)
    assert plan.num_out < 22  # something was removed
    assert_padded_equals_unpadded(block_matcher(red), x, valid)


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    p=st.integers(0, 2),
    merge=st.floats(-0.5, 1.0),
    prune=st.floats(0.0, 0.2),
    data=st.data(),
)
def test_padded_equals_unpadded(mode, p, merge, prune, data):
    n = data.draw(st.integers(max(p, 1), 28), label="n")
    x, valid, size = data.draw(padded_batches(n, max(p, 1)), label="batch")
    red = _reducer(p, mode=mode, merge_threshold=merge, prune_threshold=prune)
    assert_padded_equals_unpadded(block_matcher(red), x, valid, size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_every_block_equals_the_samples_alone(mode, p, training):
    """Three blocks from a padded input: features, sizes, soft masks and per-sample counts equal
    the unpadded runs; in training the real tokens stay first (nothing is removed)."""
    red = _reducer(p, layers=3, mode=mode, merge_threshold=0.3, prune_threshold=0.06)
    gen = torch.Generator().manual_seed(5)
    lengths = [24, 15, 8, p + 3, p + 2]
    x = torch.randn(len(lengths), 24, 6, generator=gen, dtype=torch.float64)
    valid = right_padding(lengths, 24)
    state, _ = assert_blocks_equal_samples(red, x, lengths, training)
    if training:
        assert state.valid is not None and torch.equal(state.valid, valid)
        assert state.mask is not None and (state.mask[~valid] == 0).all()
