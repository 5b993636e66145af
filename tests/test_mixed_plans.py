"""Merge weights apart from sizes, and fixed-shape plans that merge in some samples and drop
tokens in others (`Plan.prune(drop=...)`, `tmcore.plan.select`, `tmcore.matching.prune_lowest`).

Every property is checked against a brute-force reading of the Plan (a loop over output slots):
slot ``j`` holds ``keep[j]`` and every ``src[k]`` with ``src_dst[k] == j``; the rest is dropped.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

import tmcore
from tmcore.matching import prune_lowest
from tmcore.plan import (
    Plan,
    compose_source,
    destinations,
    identity_source,
    merge_tokens,
    merge_weighted,
    reduce,
    select,
    slot_positions,
    spread,
    unmerge,
)
from tmcore.testing import matching_cases, mixed_cases


def _groups(plan: Plan, i: int) -> list[list[int]]:
    """Sample ``i``'s groups, one list of input tokens per output slot."""
    groups = [[int(t)] for t in plan.keep[i]]
    for t, j in zip(plan.src[i].tolist(), plan.src_dst[i].tolist()):
        if j >= 0:
            groups[j].append(t)
    return groups


def _brute_merge(x, size, weight, plan):
    """``(features, sizes)`` by the definition: weighted mean per group, summed sizes."""
    out_x = torch.empty(x.shape[0], plan.num_out, x.shape[2], dtype=x.dtype)
    out_s = torch.empty(x.shape[0], plan.num_out, 1, dtype=size.dtype)
    for i in range(x.shape[0]):
        for j, g in enumerate(_groups(plan, i)):
            w = weight[i, g]
            out_x[i, j] = (x[i, g] * w).sum(0) / w.sum()
            out_s[i, j] = size[i, g].sum(0)
    return out_x, out_s


def _mixed(mc):
    case = mc.case
    merge = tmcore.bipartite_soft_matching(case.metric, case.r, case.num_protected)
    prune = prune_lowest(mc.score, case.r, case.num_protected)
    return merge, prune, select(mc.take_merge, merge, prune)


@given(matching_cases())
def test_weighted_merge_is_the_weighted_mean_and_sums_sizes(case):
    plan = tmcore.bipartite_soft_matching(case.metric, case.r, case.num_protected)
    weight = case.size.flip(1) + 0.5  # anything positive and unrelated to the sizes
    x, size = merge_tokens(case.x, plan.with_weight(weight), case.size)
    ref_x, ref_s = _brute_merge(case.x, case.size, weight, plan)
    torch.testing.assert_close(x, ref_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(size, ref_s, rtol=0, atol=0)


@given(matching_cases())
def test_no_weight_means_size_weighted(case):
    plan = tmcore.bipartite_soft_matching(case.metric, case.r, case.num_protected)
    x, size = merge_tokens(case.x, plan, case.size)
    ref_x, ref_s = merge_weighted(case.x, plan, case.size)
    assert torch.equal(x, ref_x) and torch.equal(size, ref_s)


@given(matching_cases())
def test_equal_weights_are_a_plain_mean_with_sizes_still_summed(case):
    plan = tmcore.bipartite_soft_matching(case.metric, case.r, case.num_protected)
    x, size = merge_tokens(case.x, plan.with_weight(torch.full_like(case.size, 0.37)), case.size)
    torch.testing.assert_close(x, merge_weighted(case.x, plan, None)[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(size, reduce(case.size, plan, "sum"))


def test_weights_carry_gradients():
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 6, 1, dtype=torch.float64, requires_grad=True)
    plan = tmcore.bipartite_soft_matching(torch.randn(2, 6, 4, dtype=torch.float64), 2, 1)
    merge_tokens(x, plan.with_weight(w + 0.1), None)[0].sum().backward()
    assert x.grad is not None and w.grad is not None and w.grad.abs().sum() > 0


@given(mixed_cases())
def test_prune_lowest_keeps_the_prefix_then_the_top_scores_in_score_order(mc):
    case, p = mc.case, mc.case.num_protected
    plan = prune_lowest(mc.score, case.r, p)
    n = mc.score.shape[1]
    assert plan.keep.shape == (mc.score.shape[0], n - case.r) and plan.src.shape == (mc.score.shape[0], case.r)
    assert torch.equal(plan.keep[:, :p], torch.arange(p).expand(mc.score.shape[0], p))
    kept = mc.score.gather(1, plan.keep[:, p:])
    assert (kept[:, :-1] >= kept[:, 1:]).all(), "kept tokens are not in descending score order"
    if case.r and n - p - case.r:
        dropped = mc.score.gather(1, plan.src)
        assert (dropped.amax(1) <= kept.amin(1)).all()
    assert (plan.src_dst == -1).all()


@given(mixed_cases())
def test_mixed_plan_is_each_sample_of_its_branch(mc):
    """The selected plan gives, per sample, exactly the branch's features, sizes and map."""
    case = mc.case
    merge, prune, mixed = _mixed(mc)
    x, size = merge_tokens(case.x, mixed, case.size)
    n = case.x.shape[1]
    assert x.shape == (case.x.shape[0], n - case.r, case.x.shape[2])
    for i in range(case.x.shape[0]):
        branch = merge if mc.take_merge[i] else prune
        one = Plan(branch.keep[i : i + 1], branch.src[i : i + 1], branch.src_dst[i : i + 1], n)
        xi, si = merge_tokens(case.x[i : i + 1], one, case.size[i : i + 1])
        assert torch.equal(x[i : i + 1], xi) and torch.equal(size[i : i + 1], si)
        ref_x, ref_s = _brute_merge(case.x[i : i + 1], case.size[i : i + 1], case.size[i : i + 1], one)
        torch.testing.assert_close(xi, ref_x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(si, ref_s, rtol=0, atol=0)


@given(mixed_cases())
def test_mixed_plan_sizes_and_source_map(mc):
    """Merging samples conserve size; dropping samples lose exactly the dropped tokens' sizes;
    the source map marks dropped tokens -1 and agrees with the sizes."""
    case = mc.case
    _, prune, mixed = _mixed(mc)
    _, size = merge_tokens(case.x, mixed, case.size)
    total, lost = case.size.sum(1).squeeze(-1), case.size.squeeze(-1).gather(1, prune.src).sum(1)
    expected = torch.where(mc.take_merge, total, total - lost)
    torch.testing.assert_close(size.sum(1).squeeze(-1), expected, rtol=0, atol=0)

    dest = destinations(mixed)
    source = compose_source(identity_source(*dest.shape), mixed)
    assert torch.equal(source, dest)
    dropped = dest < 0
    assert torch.equal(dropped.sum(1), torch.where(mc.take_merge, 0, case.r))
    # sizes from the map (all-ones inputs) equal the sizes the plan produced
    _, ones_size = merge_tokens(case.x, mixed, None)
    counts = torch.zeros(dest.shape[0], mixed.num_out + 1, dtype=torch.float64)
    counts.scatter_add_(1, torch.where(dropped, mixed.num_out, dest), torch.ones_like(dest, dtype=torch.float64))
    torch.testing.assert_close(ones_size.squeeze(-1), counts[:, :-1], rtol=0, atol=0)
    back = unmerge(merge_tokens(case.x, mixed, case.size)[0], mixed)
    assert back.shape == case.x.shape and (back[dropped] == 0).all()


@given(mixed_cases())
def test_mixed_plan_with_weights(mc):
    case = mc.case
    merge, prune, _ = _mixed(mc)
    mixed = select(mc.take_merge, merge.with_weight(mc.weight), prune.with_weight(mc.weight))
    x, size = merge_tokens(case.x, mixed, case.size)
    ref_x, ref_s = _brute_merge(case.x, case.size, mc.weight, mixed)
    torch.testing.assert_close(x, ref_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(size, ref_s, rtol=0, atol=0)


def test_drop_listed_or_not_is_the_same_pruning():
    x = torch.randn(2, 7, 3)
    keep = torch.tensor([[0, 3, 5], [0, 1, 2]])
    listed = Plan.prune(keep, 7, drop=torch.tensor([[1, 2, 4, 6], [3, 4, 5, 6]]))
    plain = Plan.prune(keep, 7)
    for mode in ("sum", "mean", "amax"):
        assert torch.equal(reduce(x, listed, mode), reduce(x, plain, mode))
    assert torch.equal(destinations(listed), destinations(plain))
    assert torch.equal(merge_tokens(x, listed, None)[1], torch.ones(2, 3, 1))


def test_select_refuses_plans_of_other_shapes():
    metric = torch.randn(2, 9, 4)
    with pytest.raises(ValueError, match="equal shapes"):
        select(
            torch.tensor([True, False]),
            tmcore.bipartite_soft_matching(metric, 2, 1),
            prune_lowest(metric[..., 0], 3, 1),
        )
    merge, prune = tmcore.bipartite_soft_matching(metric, 2, 1), prune_lowest(metric[..., 0], 2, 1)
    with pytest.raises(ValueError, match="weight"):
        select(torch.tensor([True, False]), merge.with_weight(torch.ones(2, 9, 1)), prune)


def test_prune_lowest_rejects_r_beyond_the_unprotected_tokens():
    with pytest.raises(ValueError, match=r"outside \[0, 4\]"):
        prune_lowest(torch.rand(1, 6), 5, 2)


@given(mixed_cases())
def test_slot_positions_invert_spread(mc):
    """`spread` puts every slot's value on its input positions (zeros where pruned) and
    `slot_positions` takes one position per slot back: the round trip of dense outputs."""
    _, _, plan = _mixed(mc)
    y, _ = merge_weighted(mc.case.x, plan, None)
    source = compose_source(identity_source(*mc.case.x.shape[:2]), plan)
    full = spread(y, source)
    assert full.shape == mc.case.x.shape
    assert torch.equal(full, unmerge(y, plan))
    back = full.gather(1, slot_positions(source, plan.num_out).unsqueeze(-1).expand_as(y))
    assert torch.equal(back, y)
