"""The pieces reducers compose (matching in steps, merge rules, size scales, carried state,
`Scores`, per-block config values), each checked on its own invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tmcore
from tmcore import InvalidConfigError, ModelInfo, Plan, ReducerConfig, Runtime, Scores
from tmcore.config import blocks_in_range, per_block
from tmcore.matching import best_partner, bipartite_plan, bipartite_scores, rank_descending
from tmcore.plan import carry_through, merge_amax, merge_mlerp, merge_tokens, merge_weighted, reduce
from tmcore.testing import matching_cases, padding_masks


def _plan(case):
    return tmcore.bipartite_soft_matching(case.metric, case.r, case.num_protected)


# -- matching in pieces -------------------------------------------------------------------------


@given(matching_cases())
def test_bipartite_scores_block_protected_pairs_and_equal_cosine_elsewhere(case):
    p = case.num_protected
    scores = bipartite_scores(case.metric, p)
    unit = case.metric / case.metric.norm(dim=-1, keepdim=True)
    cosine = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)
    a_prot = torch.arange(0, case.metric.shape[1], 2) < p
    b_prot = torch.arange(1, case.metric.shape[1], 2) < p
    blocked = a_prot[:, None] | b_prot[None, :]
    assert torch.isneginf(scores[:, blocked]).all()
    torch.testing.assert_close(scores[:, ~blocked], cosine[:, ~blocked], rtol=0, atol=0)


@given(matching_cases(), st.data())
def test_bipartite_scores_block_padding_pairs(case, data):
    valid = data.draw(padding_masks(case.metric.shape[0], case.metric.shape[1]))
    scores = bipartite_scores(case.metric, case.num_protected, valid)
    pad = ~valid[:, ::2, None] | ~valid[:, None, 1::2]
    assert torch.isneginf(scores[pad]).all()


@given(matching_cases())
def test_the_pieces_compose_to_bipartite_soft_matching(case):
    if case.r == 0:
        return
    best, partner = best_partner(bipartite_scores(case.metric, case.num_protected))
    plan = bipartite_plan(best, partner, case.r, case.metric.shape[1], case.num_protected)
    expected = _plan(case)
    for name in ("keep", "src", "src_dst"):
        assert torch.equal(getattr(plan, name), getattr(expected, name)), name


def test_rank_descending_breaks_ties_by_position():
    score = torch.tensor([[0.5, 0.9, 0.5, 0.9]], dtype=torch.float64)
    assert rank_descending(score).tolist() == [[1, 3, 0, 2]]


def test_bipartite_plan_per_sample_counts_on_a_padded_batch():
    torch.manual_seed(0)
    metric = torch.randn(2, 9, 4, dtype=torch.float64)
    valid = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    best, partner = best_partner(bipartite_scores(metric, 1, valid))
    plan = bipartite_plan(best, partner, 3, 9, 1, valid, each=torch.tensor([3, 1]))
    assert plan.valid.sum(1).tolist() == [6, 4]
    alone = tmcore.bipartite_soft_matching(metric[1:, :5], 1, 1)
    assert plan.keep[1, :4].tolist() == alone.keep[0].tolist()


# -- merge rules and size rules -----------------------------------------------------------------


@given(matching_cases())
def test_mlerp_keeps_each_groups_largest_norm_and_mean_direction(case):
    plan = _plan(case)
    x, size = merge_mlerp(case.x, plan, case.size)
    mean, mean_size = merge_tokens(case.x, plan, case.size)
    assert torch.equal(size, mean_size)
    largest = reduce(case.x.norm(dim=-1, keepdim=True), plan, "amax")
    torch.testing.assert_close(x.norm(dim=-1, keepdim=True), largest, rtol=1e-9, atol=1e-12)
    cos = torch.nn.functional.cosine_similarity(x, mean, dim=-1)
    nonzero = mean.norm(dim=-1) > 1e-9
    torch.testing.assert_close(cos[nonzero], torch.ones_like(cos[nonzero]), rtol=0, atol=1e-9)


@given(matching_cases())
def test_mlerp_leaves_single_tokens_as_the_weighted_mean_does(case):
    plan = _plan(case)
    x, _ = merge_mlerp(case.x, plan, case.size)
    mean, _ = merge_tokens(case.x, plan, case.size)
    alone = reduce(torch.ones_like(case.x[..., :1]), plan).squeeze(-1) == 1
    assert torch.equal(x[alone], mean[alone])


@given(matching_cases())
def test_merge_amax_takes_each_groups_maximum_and_sums_sizes(case):
    plan = _plan(case)
    x, size = merge_amax(case.x, plan, case.size)
    assert torch.equal(x, reduce(case.x, plan, "amax"))
    torch.testing.assert_close(size.sum(1), case.size.sum(1), rtol=0, atol=0)


@given(matching_cases())
def test_size_scale_scales_what_each_token_adds(case):
    plan = _plan(case)
    scale = torch.rand_like(case.size) + 0.5
    x, size = merge_tokens(case.x, plan.with_size_scale(scale), case.size)
    assert torch.equal(size, reduce(case.size * scale, plan))
    torch.testing.assert_close(x, merge_weighted(case.x, plan, case.size)[0], rtol=0, atol=0)


def test_size_scale_with_equal_weights_is_a_plain_mean():
    x = torch.tensor([[[1.0], [3.0], [5.0]]], dtype=torch.float64)
    plan = Plan(keep=torch.tensor([[0, 1]]), src=torch.tensor([[2]]), src_dst=torch.tensor([[1]]), num_in=3)
    size = torch.tensor([[[1.0], [4.0], [2.0]]], dtype=torch.float64)
    scale = torch.tensor([[[1.0], [1.0], [0.25]]], dtype=torch.float64)
    out, new = merge_tokens(x, plan.with_equal_weights().with_size_scale(scale), size)
    assert out.flatten().tolist() == [1.0, 4.0]
    assert new.flatten().tolist() == [1.0, 4.5]


def test_plan_checks_name_a_bad_size_scale():
    from tmcore.plan import plan_problems

    plan = Plan(keep=torch.tensor([[0, 1]]), src=torch.tensor([[2]]), src_dst=torch.tensor([[1]]), num_in=3)
    bad = plan.with_size_scale(torch.ones(1, 2, 1))
    assert any("Plan.size_scale has shape (1, 2, 1)" in p for p in plan_problems(bad, 1, 3, 0, torch.device("cpu")))


# -- carried state ------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["sum", "mean", "amax", "first"])
def test_carry_through_applies_the_rule_per_group(rule):
    t = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    plan = Plan(keep=torch.tensor([[0, 1]]), src=torch.tensor([[3, 2]]), src_dst=torch.tensor([[1, -1]]), num_in=4)
    out = carry_through(t, plan, rule).flatten().tolist()
    assert out == {"sum": [1.0, 6.0], "mean": [1.0, 3.0], "amax": [1.0, 4.0], "first": [1.0, 2.0]}[rule]


def test_carry_through_keeps_trailing_dimensions():
    t = torch.arange(24.0).view(1, 4, 2, 3)
    plan = Plan(keep=torch.tensor([[2, 0]]), src=torch.tensor([[1]]), src_dst=torch.tensor([[0]]), num_in=4)
    out = carry_through(t, plan, "sum")
    assert out.shape == (1, 2, 2, 3)
    assert torch.equal(out[0, 0], t[0, 2] + t[0, 1])


class _Carrier(tmcore.BaseReducer):
    """Merges 2 tokens per block by ToMe's matching; carries each token's first-block index."""

    name = "carrier"

    def match(self, layer, scores, state):
        if layer == 0:
            state.carry("origin", torch.arange(scores.metric.shape[1], dtype=torch.float64).expand(2, -1), "amax")
        return tmcore.bipartite_soft_matching(scores.metric, 2, 1)


def test_the_runtime_reduces_carried_tensors_with_every_plan_and_copies_keep_them():
    info = ModelInfo(family="test", num_layers=2, num_tokens=9, num_protected=1, class_token=True)
    runtime = Runtime(_Carrier(ReducerConfig(), info), info)
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    for layer in range(2):
        state = runtime.enter(layer, x)
        state.captured["k"] = x.unsqueeze(1)
        x = runtime.step(layer, x, state, None, 1.0)
    carried = state.carried["origin"]
    assert carried.rule == "amax" and carried.tensor.shape == (2, 5)
    assert carried.tensor[:, 0].tolist() == [0.0, 0.0]  # the class token stays itself
    assert state.copy().carried["origin"].tensor is carried.tensor


# -- scores and per-block values ----------------------------------------------------------------


def test_scores_fields_default_to_nothing():
    s = Scores(metric=torch.zeros(1, 2, 3), count=4)
    assert s.similarity is None and s.importance is None and s.each is None and s.extra == {}
    with pytest.raises(AttributeError):
        s.count = 5  # frozen: a score hand-off is not a place to keep state


@pytest.mark.parametrize(
    "value, length, pad, expected",
    [(0.5, 3, None, [0.5, 0.5, 0.5]), ([1, 2, 3], 3, None, [1, 2, 3]), ([4], 3, 0, [4, 0, 0])],
)
def test_per_block_expands(value, length, pad, expected):
    kwargs = {} if pad is None else {"pad": pad}
    assert per_block("x", "f", value, length, **kwargs) == expected


@pytest.mark.parametrize(
    "value, kwargs, message",
    [
        (
            [1, 2],
            {},
            r"invalid config for reducer 'x': f=\[1, 2\] has 2 entries for a model with 3 blocks; "
            r"allowed: one value for every block, or a list of exactly 3 entries, one per block",
        ),
        ([1, 2, 3, 4], {"pad": 0}, r"f=\[1, 2, 3, 4\] has 4 entries .* at most 3 entries \(missing ones are 0\)"),
        ([1], {"per": "listed block", "of": "layers=[1, 2, 3]"}, r"has 1 entries for layers=\[1, 2, 3\]; .* listed"),
    ],
)
def test_per_block_refuses_other_lengths_naming_field_value_and_rule(value, kwargs, message):
    with pytest.raises(InvalidConfigError, match=message):
        per_block("x", "f", value, 3, **kwargs)


def test_every_per_block_field_uses_the_one_rule():
    from tmcore.testing import tiny_timm_models

    configs = [
        ("tome", {"r": [1] * 5}),
        ("pitome", {"ratio": [0.9] * 3}),
        ("ltmp", {"merge_threshold": [0.9, 0.9]}),
        ("ppt", {"layers": [1, 2], "r": [4]}),
    ]
    for reducer, config in configs:
        with pytest.raises(InvalidConfigError, match=r"has \d entries for .*; allowed: one value for every"):
            tmcore.apply(tiny_timm_models()["vit"](), reducer, **config)


def test_block_lists_are_checked_against_the_depth_by_one_rule():
    assert blocks_in_range("x", "layers", [0, 3], 4) == [0, 3]
    with pytest.raises(InvalidConfigError, match=r"'x': layers=\[1, 7\]: block\(s\) \[7\] out of range .* 0 to 3"):
        blocks_in_range("x", "layers", [1, 7], 4)
