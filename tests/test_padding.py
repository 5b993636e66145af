"""Padding in the core: padded batches give every sample its unpadded plan, the mask enters the
state at block 0, reducers that drop it fail loudly, and pooling weighs padding 0."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tmcore import BaseReducer, ModelInfo, Plan, ReducerConfig, Runtime, TmcoreError
from tmcore.inputs import split_samples
from tmcore.matching import bipartite_soft_matching, max_bipartite_r, prune_lowest, prune_lowest_in_order
from tmcore.plan import destinations, pack, select
from tmcore.pooling import mean_pool
from tmcore.testing import assert_padded_equals_unpadded, right_padding


@st.composite
def padded_cases(draw: st.DrawFn, max_tokens: int = 30) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(x [B, N, C], valid [B, N], r, p)``: right-padded samples of random lengths (the first
    as long as the batch), ``r`` up to the 50 % cap of the padded length, some duplicate tokens."""
    p = draw(st.integers(0, 3))
    n = draw(st.integers(p + 2, max_tokens))
    lengths = [n] + draw(st.lists(st.integers(p + 1, n), min_size=1, max_size=3))
    r = draw(st.integers(0, max_bipartite_r(n, p)))
    return _case(p, lengths, r, draw(st.integers(0, 2**16)), ties=draw(st.booleans()))


def _case(p: int, lengths: list[int], r: int, seed: int, ties: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    n = lengths[0]
    x = torch.randn(len(lengths), n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if ties:  # exact ties: every third token a copy of the first
        x[:, 1::3] = x[:, :1]
    return x, right_padding(lengths, n), r, p


def _alone(r: int, p: int):
    """What the reducers do on one unpadded sample: r capped at half its unprotected tokens."""
    return lambda x: min(r, max_bipartite_r(x.shape[1], p))


@given(padded_cases())
# Exact ties whose similarities a matmul rounded 1 ulp apart in the padded batch and alone, so
# that the ties went one way padded and the other alone (fixed by tmcore.matching.rank_key)
@example(_case(2, [25, 20, 20], 6, 36058, ties=True))
@example(_case(0, [27, 3, 14, 20], 7, 30729, ties=True))
def test_bipartite_matching_on_a_padded_batch_equals_each_sample_alone(case):
    x, valid, r, p = case
    cap = _alone(r, p)
    assert_padded_equals_unpadded(
        lambda t, v: bipartite_soft_matching(t, r if v is not None else cap(t), p, v), x, valid
    )


@given(padded_cases())
@example(_case(2, [25, 20, 20], 6, 36058, ties=True))
def test_pruning_on_a_padded_batch_equals_each_sample_alone(case):
    x, valid, r, p = case
    cap = _alone(r, p)
    assert_padded_equals_unpadded(lambda t, v: prune_lowest(t[..., 0], r if v is not None else cap(t), p, v), x, valid)


@given(padded_cases())
def test_padded_merge_and_prune_plans_pair_up_for_select(case):
    x, valid, r, p = case
    a = bipartite_soft_matching(x, r, p, valid)
    b = prune_lowest(x[..., 0], r, p, valid)
    take = torch.arange(x.shape[0]) % 2 == 0
    mixed = select(take, a, b)
    for i in range(x.shape[0]):
        one = a if take[i] else b
        assert torch.equal(destinations(mixed)[i], destinations(one)[i])
        assert torch.equal(mixed.valid[i], one.valid[i])


def test_padded_plans_have_a_static_size_and_no_padding_in_real_groups():
    x = torch.randn(3, 20, 4)
    valid = right_padding([20, 11, 4], 20)
    plan = bipartite_soft_matching(x, 6, 1, valid)
    assert plan.num_out == 14  # N - r: no host sync to size it
    assert plan.valid.sum(1).tolist() == [14, 11 - 5, 4 - 1]
    dest = destinations(plan)
    for i, n in enumerate([20, 11, 4]):
        pad = dest[i, n:]
        assert not plan.valid[i].gather(0, pad[pad >= 0]).any()


def test_pack_with_a_known_size_does_not_need_the_counts():
    candidates = torch.arange(6)
    kept = torch.tensor([[True, True, False, True, False, False], [True, False, False, False, False, False]])
    plan = pack(candidates, kept, 6, num_out=4)
    assert plan.keep.shape == (2, 4)
    assert plan.valid.tolist() == [[True, True, True, False], [True, False, False, False]]
    assert plan.keep[0, :3].tolist() == [0, 1, 3]


# -- the runtime ---------------------------------------------------------------------------------


class _Nothing(BaseReducer):
    """Keeps every token, and forgets the padding mask (what the runtime must catch)."""

    name = "nothing"

    def match(self, layer, scores, state):
        b, n = scores.metric.shape[:2]
        return Plan.prune(torch.arange(n).expand(b, -1), n)


INFO = ModelInfo(family="test", num_layers=1, num_tokens=5, num_protected=1, class_token=True)


def _runtime(reducer=None, full_length=False):
    return Runtime(reducer or _Nothing(ReducerConfig(), INFO), INFO, full_length)


def test_the_input_mask_enters_the_state_at_block_0():
    runtime = _runtime()
    x = torch.randn(2, 5, 4)
    state = runtime.enter(0, x, valid=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert state.valid.tolist() == [[True, True, True, False, False], [True] * 5]
    assert state.count(x).tolist() == [3, 5]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        bias = state.attn_bias(dtype)  # the dtype's lowest value, not -inf: all-padding rows stay finite
        assert bias.shape == (2, 1, 1, 5) and bias.dtype == dtype and (bias[1] == 0).all()
        assert (bias[0, 0, 0, 3:] == torch.finfo(dtype).min).all() and (bias[0, 0, 0, :3] == 0).all()
    runtime.clear()
    # a mask with nothing padded takes the padded path too: telling would need a host sync
    assert runtime.enter(0, x, valid=torch.ones(2, 5)).valid.all()


def test_left_padding_and_wrong_shapes_are_refused():
    runtime = _runtime()
    x = torch.randn(2, 5, 4)
    with pytest.raises(TmcoreError, match="padding_side='right'"):
        runtime.enter(0, x, valid=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(TmcoreError, match=r"allowed: \[batch, tokens\] = \(2, 5\)"):
        runtime.enter(0, x, valid=torch.ones(2, 6))


def test_a_plan_that_forgets_the_padding_is_an_error():
    runtime = _runtime()
    x = torch.randn(2, 5, 4)
    state = runtime.enter(0, x, valid=right_padding([5, 3], 5))
    state.captured["k"] = torch.randn(2, 1, 5, 4)
    with pytest.raises(TmcoreError, match="reducer 'nothing' returned a plan without validity"):
        runtime.step(0, x, state, None, 1.0)


def test_full_length_restores_the_input_layout():
    class Merge(_Nothing):
        def match(self, layer, scores, state):
            return bipartite_soft_matching(scores.metric, 2, 1)

    runtime = _runtime(Merge(ReducerConfig(), INFO), full_length=True)
    x = torch.randn(2, 5, 4)
    state = runtime.enter(0, x)
    state.captured["k"] = x.unsqueeze(1)
    y = runtime.step(0, x, state, None, 1.0)
    assert y.shape[1] == 3
    out = runtime.exit(0, y, state)
    assert out.shape == x.shape
    assert torch.equal(out[:, 0], x[:, 0])  # the protected token is unchanged
    assert state.size is None and state.valid is None


def test_mean_pool_counts_each_token_by_its_size_and_skips_padding():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    sizes = torch.tensor([[1.0, 3.0, 1.0], [1.0, 1.0, 2.0]])
    assert mean_pool(hidden, mask, sizes).squeeze(-1).tolist() == [2.5, 4.5]
    assert mean_pool(hidden, mask).squeeze(-1).tolist() == [2.0, 4.0]


def test_split_samples_cuts_each_samples_padding():
    inputs = {"input_ids": torch.arange(8).view(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    one, two = split_samples(inputs)
    assert one["input_ids"].tolist() == [[0, 1, 2, 3]]
    assert two["input_ids"].tolist() == [[4, 5]] and two["attention_mask"].tolist() == [[1, 1]]


@pytest.mark.parametrize("p", [0, 1, 2])
def test_exact_ties_go_by_position_alone_in_a_batch_and_padded(p):
    """Identical tokens (every similarity and every score equal): ToMe's matching merges the
    first ``r`` A tokens into the first B token, pruning keeps the earliest tokens, and the
    lowest-first pruning drops the earliest: by position, padded and in a batch as alone,
    although the matmul rounds the equal similarities differently by where they fall."""
    n, r = 23, 5
    x = torch.randn(1, 1, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64).expand(3, n, 6)
    valid = right_padding([n, 17, 12], n)
    for v in (None, valid):
        plan = bipartite_soft_matching(x, r, p, v)
        dest = destinations(plan)
        for i, n_i in enumerate([n, 17, 12] if v is not None else [n] * 3):
            a_first = [2 * j for j in range((p + 1) // 2, (p + 1) // 2 + min(r, (n_i - p) // 2))]
            merged = [
                t for t in range(p, n_i) if t not in plan.keep[i, : int(plan.valid[i].sum()) if v is not None else None]
            ]
            assert merged == a_first, (p, i, merged)
            target = dest[i, 2 * (p // 2) + 1]  # the first unprotected B token's slot
            assert (dest[i, a_first] == target).all()
    score = torch.full((3, n), 0.25, dtype=torch.float64)
    for v in (None, valid):
        kept = prune_lowest(score, r, p, v).keep
        assert kept[0, : n - r].tolist() == list(range(n - r))  # the earliest, in position order
    dropped = prune_lowest_in_order(score, r, p).keep
    assert dropped[0].tolist() == list(range(p)) + list(range(p + r, n))  # the earliest went first
