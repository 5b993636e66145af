"""Padded batches: every sample keeps ``ceil(keep_rate * T_i)`` of its real tokens and fuses the
rest, exactly as alone, unpadded (tokens, order, fusion weights, sizes, counts); padding is never
kept or fused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tm_topk import TopK
from tmcore.testing.padding import (
    assert_blocks_equal_samples,
    assert_padded_equals_unpadded,
    block_matcher,
    make_reducer,
    right_padding,
)
from tmcore.testing.strategies import padded_batches


def _reducer(p: int, layers: int = 1, tokens: int = 24, **config) -> TopK:
    return make_reducer("topk", p, layers, tokens, class_token=True, layers=list(range(layers)), **config)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("keep_rate", [0.3, 0.7, 0.95])
@pytest.mark.parametrize("fuse", [True, False])
def test_short_samples_equal_their_unpadded_plans(p, keep_rate, fuse):
    x = torch.randn(7, 22, 6, generator=torch.Generator().manual_seed(p), dtype=torch.float64)
    valid = right_padding([22, 17, 13, p, p + 1, p + 2, p + 3], 22)
    red = _reducer(p, tokens=22, keep_rate=keep_rate, fuse_token=fuse)
    assert_padded_equals_unpadded(block_matcher(red), x, valid)


@settings(max_examples=60, deadline=None)
@given(
    p=st.integers(1, 2),
    keep_rate=st.floats(0.01, 1.0),
    fuse=st.booleans(),
    data=st.data(),
)
def test_padded_equals_unpadded(p, keep_rate, fuse, data):
    n = data.draw(st.integers(p + 1, 26), label="n")
    x, valid, size = data.draw(padded_batches(n, p), label="batch")
    red = _reducer(p, tokens=n, keep_rate=keep_rate, fuse_token=fuse)
    assert_padded_equals_unpadded(block_matcher(red), x, valid, size)


def test_padding_is_never_kept_or_fused():
    red = _reducer(1, tokens=20, keep_rate=0.5)
    x = torch.randn(3, 20, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    valid = right_padding([20, 9, 2], 20)
    plan = block_matcher(red)(x, valid)
    assert plan.num_out == 1 + 10 + 1, "p + k + 1 slots for the longest sample: no host synchronisation"
    # real unprotected tokens 19, 8, 1 -> kept ceil(0.5 T): 10, 4, 1; fused slot where some remain
    assert plan.valid.sum(1).tolist() == [12, 6, 2]
    joined = plan.src[plan.src_dst >= 0]
    assert not (~valid.gather(1, plan.src))[plan.src_dst >= 0].any(), "a padding token joined the fused slot"
    assert joined.numel() == (19 - 10 - 1) + (8 - 4 - 1)
    kept = plan.keep.masked_fill(~plan.valid, 0)
    assert valid.gather(1, kept).all(), "a padding token was kept"
    assert torch.equal(plan.weight[~valid], torch.ones_like(plan.weight[~valid])), "padding has no fusion weight"


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("fuse", [True, False])
def test_every_block_equals_the_samples_alone(p, fuse):
    """Three reducing blocks, through the core's runtime with EViT's own `reduce` (the weighted
    sum): features, sizes and per-sample counts equal the unpadded runs."""
    red = _reducer(p, layers=3, keep_rate=0.6, fuse_token=fuse)
    x = torch.randn(5, 24, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert_blocks_equal_samples(red, x, [24, 15, 8, p + 3, p + 1])
