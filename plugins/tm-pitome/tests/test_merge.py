"""Properties of the pure functions (docs/algorithms.md section 9) on random, tie-rich inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tmcore
from tm_pitome import elu_energy, gaussian_energy, merge_count, pitome_match, similarity
from tm_pitome.merge import VARIANTS
from tmcore.plan import destinations
from tmcore.testing import matching_cases

VARIANT = st.sampled_from(sorted(VARIANTS))


def _r(case, data) -> int:
    t = case.metric.shape[1] - case.num_protected
    return data.draw(st.integers(1, max(t // 2, 1)))


@settings(max_examples=100, deadline=None)
@given(case=matching_cases(max_tokens=32), variant=VARIANT, margin=st.floats(-0.9, 0.9), data=st.data())
def test_plan_invariants(case, variant, margin, data):
    p, (b, n, _) = case.num_protected, case.metric.shape
    if n - p < 2:
        return
    r = _r(case, data)
    plan = pitome_match(case.metric, r, margin, variant, num_protected=p)
    assert plan.num_out == n - r and plan.src.shape == (b, r)
    # the protected prefix stays in front, in order, and nothing merges into it
    assert torch.equal(plan.keep[:, :p], torch.arange(p).expand(b, p))
    assert bool((plan.src >= p).all()) and bool((plan.src_dst >= p).all())
    # every input token lands in exactly one output slot
    seen = torch.cat([plan.keep, plan.src], dim=1).sort(dim=1).values
    assert torch.equal(seen, torch.arange(n).expand(b, n))
    assert bool((destinations(plan) >= 0).all())
    # sizes are conserved and merged features are the size-weighted group means
    x, size = tmcore.merge_weighted(case.x, plan, case.size)
    torch.testing.assert_close(size.sum(1), case.size.sum(1), rtol=0, atol=0)
    slot = destinations(plan).unsqueeze(-1)
    weighted = torch.zeros_like(x).scatter_add_(1, slot.expand_as(case.x), case.x * case.size)
    weights = torch.zeros_like(size).scatter_add_(1, slot, case.size)
    torch.testing.assert_close(size, weights, rtol=0, atol=0)
    torch.testing.assert_close(x, weighted / weights, rtol=1e-12, atol=1e-12)
    # unmerge brings back the input length; unmerged tokens get their own value back
    back = tmcore.unmerge(x, plan)
    assert back.shape == case.x.shape
    torch.testing.assert_close(back[:, :p], case.x[:, :p], rtol=1e-14, atol=1e-14)  # w * x / w


# No duplicated tokens here: BLAS may round the similarity of two identical tokens differently
# depending on the batch shape, and then the tie between them breaks differently.
@settings(max_examples=60, deadline=None)
@given(case=matching_cases(max_tokens=32, duplicates=False), variant=VARIANT, data=st.data())
def test_batch_equals_samples(case, variant, data):
    p, n = case.num_protected, case.metric.shape[1]
    if n - p < 2:
        return
    r = _r(case, data)
    plan = pitome_match(case.metric, r, 0.4, variant, num_protected=p)
    for i in range(case.metric.shape[0]):
        one = pitome_match(case.metric[i : i + 1], r, 0.4, variant, num_protected=p)
        assert torch.equal(one.keep[0], plan.keep[i])
        assert torch.equal(one.src[0], plan.src[i])
        assert torch.equal(one.src_dst[0], plan.src_dst[i])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_identical_tokens_still_remove_exactly_r(variant):
    """docs/algorithms.md 9.10: with all energies equal the procedure still removes exactly r."""
    metric = torch.ones(2, 21, 4, dtype=torch.float64)
    x = torch.randn(2, 21, 3, dtype=torch.float64)
    r = merge_count(20, 0.6)
    plan = pitome_match(metric, r, 0.5, variant, num_protected=1)
    y, size = tmcore.merge_weighted(x, plan)
    assert y.shape == (2, 21 - r, 3) and r == 8
    assert torch.equal(size.sum(1), torch.full((2, 1), 21.0, dtype=torch.float64))
    # stable sorts: the energy order of equal tokens is their position, so the plan is fixed
    assert torch.equal(plan.keep[0], plan.keep[1])


def test_merging_equal_tokens_returns_them_unchanged():
    torch.manual_seed(0)
    token = torch.randn(1, 1, 5, dtype=torch.float64)
    x = token.expand(1, 13, 5)
    plan = pitome_match(torch.randn(1, 13, 4, dtype=torch.float64), 6, 0.3, "pitome", num_protected=1)
    y, _ = tmcore.merge_weighted(x, plan, torch.randint(1, 4, (1, 13, 1)).double())
    torch.testing.assert_close(y, token.expand(1, 7, 5), rtol=1e-14, atol=1e-14)


def test_energies_follow_the_formulas():
    """Elementwise definitions of docs/algorithms.md 3.2, the mean running over all T tokens incl. self."""
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 9, 5, generator=gen, dtype=torch.float64)
    sim = similarity(metric)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    for b in range(2):
        for i in range(9):
            cos = [float(unit[b, i] @ unit[b, j]) for j in range(9)]
            elu = [c - 0.3 if c > 0.3 else 0.7 * (math.exp(c - 0.3) - 1) for c in cos]
            assert elu_energy(sim, 0.3, alpha=0.7)[b, i].item() == pytest.approx(sum(elu) / 9, abs=1e-14)
            sigma = 1 - 0.8
            gauss = [math.exp(-0.5 * ((1 - c) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi)) for c in cos]
            assert gaussian_energy(sim, 0.8)[b, i].item() == pytest.approx(sum(gauss) / 9, abs=1e-12)


def test_output_orders():
    """Hand-made similarities and energy order: the orders the original produces (docs/algorithms.md 3.3)."""
    sim = torch.eye(6, dtype=torch.float64).unsqueeze(0)  # 6 tokens after 1 class token
    order = torch.tensor([[3, 5, 1, 0, 4, 2]])  # descending energy
    for i, j, s in [(3, 0, 0.9), (3, 1, 0.95), (1, 5, 0.5), (5, 0, 0.2)]:
        sim[0, i, j] = sim[0, j, i] = s

    # pitome, r=2: candidates 3,5,1,0 alternate A=3,1 / B=5,0; 3 -> 0 and 1 -> 5
    plan = VARIANTS["pitome"](sim, order, 2, 1)
    assert plan.keep.tolist() == [[0, 1 + 4, 1 + 2, 1 + 5, 1 + 0]]  # [cls, protected 4,2, B 5,0]
    assert plan.src.tolist() == [[1 + 3, 1 + 1]] and plan.src_dst.tolist() == [[4, 3]]

    # pitome_text, r=2: energy halves A=3,5 / B=1,0; both merge into 1 (many-to-one)
    text = VARIANTS["pitome_text"](sim, order, 2, 1)
    assert text.keep.tolist() == [[0, 1 + 4, 1 + 2, 1 + 1, 1 + 0]]
    assert text.src.tolist() == [[1 + 3, 1 + 5]] and text.src_dst.tolist() == [[3, 3]]

    # pitome_bsm, r=1: A=3,1,4 / B=5,0,2; best scores 0.9 (3 -> 0), 0.5 (1 -> 5), 0 (4); 3 merges,
    # unmerged A stay in descending-score order (1, 4), then all of B in energy order
    bsm = VARIANTS["pitome_bsm"](sim, order, 1, 1)
    assert bsm.keep.tolist() == [[0, 1 + 1, 1 + 4, 1 + 5, 1 + 0, 1 + 2]]
    assert bsm.src.tolist() == [[1 + 3]] and bsm.src_dst.tolist() == [[4]]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_r_out_of_range_is_refused(variant):
    metric = torch.randn(1, 11, 4)
    with pytest.raises(ValueError, match=f"{variant}: r=6 is outside"):
        pitome_match(metric, 6, 0.5, variant, num_protected=1)
    with pytest.raises(ValueError, match="r=0"):
        pitome_match(metric, 0, 0.5, variant, num_protected=1)
