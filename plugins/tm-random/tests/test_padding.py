"""Padded batches: every sample drops exactly the tokens it drops alone, unpadded and numbered as
in its batch (same draws, tokens, order and counts), including very short samples and the
per-length cap."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from tm_random import RandomPrune
from tmcore import LayerInputs, Plan, Runtime, ScheduleClampWarning
from tmcore.testing.padding import assert_padded_equals_unpadded, make_reducer, padded_state, right_padding

# short samples run alone cap r at their unprotected tokens minus one, with a warning each time
pytestmark = pytest.mark.filterwarnings("ignore", category=ScheduleClampWarning)


def _reducer(p: int, layers: int = 1, tokens: int = 24, **config) -> RandomPrune:
    return make_reducer("random", p, layers, tokens, **config)


class _NumberedMatcher:
    """``match(x, valid)`` of block 0 for `assert_padded_equals_unpadded`, which calls it once on
    the padded batch (samples numbered 0 .. B-1) and then once per sample alone, in order: the
    ``i``-th lone call is numbered ``i``, as `tmcore.runtime.Runtime.numbered_from` would."""

    def __init__(self, reducer: RandomPrune) -> None:
        self.reducer = reducer
        self.alone = 0

    def __call__(self, x: Tensor, valid: Tensor | None) -> Plan:
        red = self.reducer
        state = padded_state(red, x, valid)
        if valid is None:
            state.first_sample, self.alone = self.alone, self.alone + 1
        plan = red.match(0, red.score(0, LayerInputs({}, None, 1.0, red.needs(0), tokens=x), state), state)
        b, n = x.shape[:2]
        return plan if plan is not None else Plan.prune(torch.arange(n).expand(b, n), n, valid)


def _run(red: RandomPrune, x: Tensor, valid: Tensor | None = None, first: int = 0) -> tuple[Tensor, list]:
    """Every block through the core's `Runtime`, numbered from ``first``: the tokens after the
    last block and the tokens entering each block (then leaving the last)."""
    rt = Runtime(red, red.info)
    counts = []
    with rt.numbered_from(first):
        for layer in range(red.info.num_layers):
            state = rt.enter(layer, x, training=False, valid=valid if layer == 0 else None)
            counts.append(state.count(x))
            x = rt.exit(layer, rt.step(layer, x, state, None, 1.0), state)
    counts.append(state.count(x))
    return x, counts


@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("r", [1, 4, 20])
def test_short_samples_equal_their_unpadded_plans(p, r):
    x = torch.randn(7, 22, 5, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
    valid = right_padding([22, 13, max(p, 1), p, p + 1, p + 2, p + 3], 22)
    assert_padded_equals_unpadded(_NumberedMatcher(_reducer(p, tokens=22, r=r, seed=r)), x, valid)


@settings(max_examples=60, deadline=None)
@given(p=st.integers(0, 2), seed=st.integers(0, 2**63 - 1), data=st.data())
def test_padded_equals_unpadded(p, seed, data):
    n = data.draw(st.integers(p + 1, 30), label="n")
    r = data.draw(st.integers(0, max(n - p - 1, 0)), label="r")
    lengths = data.draw(st.lists(st.integers(p, n), min_size=1, max_size=4), label="lengths")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="x"))
    x = torch.randn(len(lengths), n, 4, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 4, (len(lengths), n, 1), generator=gen).double()
    match = _NumberedMatcher(_reducer(p, tokens=n, r=r, seed=seed))
    assert_padded_equals_unpadded(match, x, right_padding(lengths, n), size)


def test_each_sample_drops_r_or_all_its_tokens_but_one():
    red = _reducer(1, tokens=20, r=6)
    x = torch.randn(5, 20, 3, dtype=torch.float64)
    plan = _NumberedMatcher(red)(x, right_padding([20, 8, 3, 2, 1], 20))
    assert plan.num_out == 14, "the padded plan has N - r slots: no host synchronisation"
    # real unprotected tokens 19, 7, 2, 1, 0 -> dropped 6, 6, 1, 0, 0
    assert plan.valid.sum(1).tolist() == [14, 2, 2, 2, 1]
    assert (plan.keep[:, 0] == 0).all(), "the class token stays first"


@pytest.mark.parametrize("p", [0, 1, 2])
def test_every_block_equals_the_samples_alone(p):
    """Four blocks whose ``r`` the cap changes for each length: features and per-sample counts
    equal the unpadded runs, each sample numbered as in its batch."""
    red = _reducer(p, layers=4, r=[6, 5, 4, 3], seed=11)
    x = torch.randn(5, 24, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lengths = [24, 15, 8, p + 3, p + 1]
    with torch.no_grad():
        out, counts = _run(red, x, right_padding(lengths, 24))
        for i, n_i in enumerate(lengths):
            alone, alone_counts = _run(red, x[i : i + 1, :n_i], first=i)
            assert [int(c if isinstance(c, int) else c[i]) for c in counts] == alone_counts, f"sample {i}"
            assert torch.equal(out[i, : alone.shape[1]], alone[0])
    expected = []
    for n_i in lengths:
        t = n_i - p
        for r in [6, 5, 4, 3]:
            t -= max(min(r, t - 1), 0)
        expected.append(p + t)
    assert counts[-1].tolist() == expected
