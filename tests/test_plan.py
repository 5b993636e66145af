"""Property tests of the Plan ops and bipartite soft matching (docs/algorithms.md section 9)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tmcore
from tmcore.plan import Plan, compose_source, destinations, identity_source, reduce, source_matrix, unmerge
from tmcore.testing import matching_cases


def _plan(case):
    return tmcore.bipartite_soft_matching(case.metric, case.r, case.num_protected)


@given(matching_cases())
def test_output_length_and_size_conserved(case):
    plan = _plan(case)
    x, size = tmcore.merge_weighted(case.x, plan, case.size)
    n = case.metric.shape[1]
    assert x.shape == (case.x.shape[0], n - case.r, case.x.shape[2])
    torch.testing.assert_close(size.sum(1), case.size.sum(1), rtol=0, atol=0)


@given(matching_cases())
def test_protected_tokens_stay_in_place(case):
    plan = _plan(case)
    p = case.num_protected
    x, size = tmcore.merge_weighted(case.x, plan, case.size)
    assert torch.equal(plan.keep[:, :p], torch.arange(p).expand(plan.keep.shape[0], p))
    assert not torch.isin(plan.src, torch.arange(p)).any(), "a protected token merged away"
    assert not (plan.src_dst < p).any(), "a token merged into a protected token"
    torch.testing.assert_close(x[:, :p], case.x[:, :p])
    torch.testing.assert_close(size[:, :p], case.size[:, :p])


@given(matching_cases())
def test_every_input_token_lands_in_exactly_one_output(case):
    plan = _plan(case)
    dest = destinations(plan)
    assert ((dest >= 0) & (dest < plan.num_out)).all()
    src = compose_source(identity_source(*dest.shape), plan)
    assert torch.equal(src, dest)
    matrix = source_matrix(src, plan.num_out)
    assert torch.equal(matrix.sum(1), torch.ones_like(dest))
    assert (matrix.sum(2) >= 1).all(), "an output slot without any input token"


@given(matching_cases(), st.integers(0, 2**31 - 1))
def test_source_composes_over_layers(case, seed):
    """Two layers: the composed source map agrees with the sizes the merges produced."""
    plan1 = _plan(case)
    x1, s1 = tmcore.merge_weighted(case.x, plan1, None)
    n1 = plan1.num_out
    gen = torch.Generator().manual_seed(seed)
    metric2 = torch.randn(case.x.shape[0], n1, 4, generator=gen, dtype=torch.float64)
    r2 = min(case.r, tmcore.matching.max_bipartite_r(n1, case.num_protected))
    plan2 = tmcore.bipartite_soft_matching(metric2, r2, case.num_protected)
    _, s2 = tmcore.merge_weighted(x1, plan2, s1)
    src = compose_source(compose_source(identity_source(case.x.shape[0], case.x.shape[1]), plan1), plan2)
    assert torch.equal(source_matrix(src, plan2.num_out).sum(2).to(s2.dtype), s2.squeeze(-1))


@given(matching_cases())
def test_unmerge_restores_length_and_unmerged_values(case):
    plan = _plan(case)
    y, size = tmcore.merge_weighted(case.x, plan, case.size)
    back = unmerge(y, plan)
    assert back.shape == case.x.shape
    # a token whose group holds only itself comes back unchanged ...
    alone = (reduce(torch.ones_like(case.size), plan) == 1).squeeze(-1)
    dest = destinations(plan)
    untouched = alone.gather(1, dest)
    torch.testing.assert_close(back[untouched], case.x[untouched])
    # ... and every token comes back as its group's value
    torch.testing.assert_close(back, y.gather(1, dest.unsqueeze(-1).expand_as(case.x)))


@given(matching_cases())
def test_identical_tokens_merge_to_themselves(case):
    plan = _plan(case)
    x = case.x[:, :1].expand_as(case.x).contiguous()  # every token of a sample is the same vector
    merged, _ = tmcore.merge_weighted(x, plan, case.size)
    torch.testing.assert_close(merged, x[:, : plan.num_out], rtol=1e-12, atol=1e-12)


# No duplicated tokens here: BLAS may round the similarity of two identical tokens differently
# for a batch than for one sample (it picks kernels by shape), and then their tie breaks
# differently. Ties themselves are covered per sample above.
@given(matching_cases(max_batch=4, duplicates=False))
def test_batched_equals_per_sample(case):
    plan = _plan(case)
    x, size = tmcore.merge_weighted(case.x, plan, case.size)
    for i in range(case.x.shape[0]):
        one = tmcore.bipartite_soft_matching(case.metric[i : i + 1], case.r, case.num_protected)
        assert torch.equal(one.keep, plan.keep[i : i + 1])
        assert torch.equal(one.src, plan.src[i : i + 1])
        assert torch.equal(one.src_dst, plan.src_dst[i : i + 1])
        xi, si = tmcore.merge_weighted(case.x[i : i + 1], one, case.size[i : i + 1])
        torch.testing.assert_close(xi, x[i : i + 1], rtol=0, atol=0)


def test_r_zero_is_identity():
    metric, x = torch.randn(2, 9, 4), torch.randn(2, 9, 3)
    plan = tmcore.bipartite_soft_matching(metric, 0, 1)
    assert torch.equal(tmcore.reduce(x, plan), x)


def test_reduce_modes_include_the_slot_itself():
    x = torch.tensor([[[1.0], [5.0], [3.0]]])
    plan = Plan(keep=torch.tensor([[0, 2]]), src=torch.tensor([[1]]), src_dst=torch.tensor([[0]]), num_in=3)
    assert reduce(x, plan, "sum").flatten().tolist() == [6.0, 3.0]
    assert reduce(x, plan, "mean").flatten().tolist() == [3.0, 3.0]
    assert reduce(x, plan, "amax").flatten().tolist() == [5.0, 3.0]


def test_prune_plan_drops_tokens():
    x = torch.arange(5.0).view(1, 5, 1)
    plan = Plan.prune(torch.tensor([[0, 3, 1]]), num_in=5)
    assert reduce(x, plan).flatten().tolist() == [0.0, 3.0, 1.0]
    assert destinations(plan).tolist() == [[0, 2, -1, 1, -1]]
    assert unmerge(reduce(x, plan), plan).flatten().tolist() == [0.0, 1.0, 0.0, 3.0, 0.0]


def test_matching_rejects_r_beyond_the_limit():
    import pytest

    with pytest.raises(ValueError, match="outside"):
        tmcore.bipartite_soft_matching(torch.randn(1, 9, 4), 5, 1)


def test_merge_weighted_gradients_flow():
    x = torch.randn(2, 11, 5, requires_grad=True)
    size = torch.ones(2, 11, 1)
    plan = tmcore.bipartite_soft_matching(torch.randn(2, 11, 4), 4, 1)
    y, _ = tmcore.merge_weighted(x, plan, size * 2)
    y.sum().backward()
    torch.testing.assert_close(x.grad.sum(), torch.tensor(2 * 7 * 5.0))


def is_kept_of(kept, candidates):
    """``[B, N]``: whether each input token is a kept candidate."""
    position = torch.empty_like(candidates).scatter_(0, candidates, torch.arange(candidates.shape[0]))
    return kept.gather(1, position.expand_as(kept))


@st.composite
def ragged_cases(draw):
    """Per-sample decisions for `pack`: kept candidates (token 0 always kept) and, for the
    others, an optional candidate to merge into (kept or not)."""
    b, n, c = draw(st.integers(1, 4)), draw(st.integers(1, 24)), draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    candidates = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(n - 1, generator=gen) + 1])
    kept = torch.rand(b, n, generator=gen) < draw(st.floats(0.1, 0.9))
    kept[:, 0] = True
    src = torch.arange(n).expand(b, n)
    is_kept = is_kept_of(kept, candidates)
    target = torch.randint(0, n, (b, n), generator=gen)
    target = torch.where(is_kept | (torch.rand(b, n, generator=gen) < 0.5), -1, target)
    x = torch.randn(b, n, c, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 4, (b, n, 1), generator=gen).double()
    return candidates, kept, src, target, x, size


@given(ragged_cases())
def test_ragged_plan_equals_per_sample_plans(case):
    from tmcore.plan import pack

    candidates, kept, src, target, x, size = case
    b, n = kept.shape
    plan = pack(candidates, kept, n, src, target)
    counts = kept.sum(1)
    assert plan.num_out == int(counts.max()) and torch.equal(plan.valid.sum(1), counts)
    assert torch.equal(plan.valid, torch.arange(plan.num_out) < counts[:, None])
    merged, new_size = tmcore.merge_weighted(x, plan, size)
    summed, amax = reduce(x, plan, "sum"), reduce(x, plan, "amax")
    dest = destinations(plan)
    back = unmerge(merged, plan)
    assert torch.isfinite(merged).all() and (new_size > 0).all(), "padding slots must stay finite"
    for i in range(b):
        one = pack(candidates, kept[i : i + 1], n, src[i : i + 1], target[i : i + 1])
        m = int(counts[i])
        assert one.valid.all() and one.num_out == m
        xi, si = tmcore.merge_weighted(x[i : i + 1], one, size[i : i + 1])
        torch.testing.assert_close(merged[i : i + 1, :m], xi, rtol=0, atol=0)
        torch.testing.assert_close(new_size[i : i + 1, :m], si, rtol=0, atol=0)
        torch.testing.assert_close(summed[i : i + 1, :m], reduce(x[i : i + 1], one, "sum"), rtol=0, atol=0)
        torch.testing.assert_close(amax[i : i + 1, :m], reduce(x[i : i + 1], one, "amax"), rtol=0, atol=0)
        assert torch.equal(dest[i : i + 1], destinations(one))
        torch.testing.assert_close(back[i : i + 1], unmerge(xi, one), rtol=0, atol=0)
    # every token lands in a real slot or is dropped; a merged token joins its target's slot
    assert (plan.valid.gather(1, dest.clamp(min=0))[dest >= 0]).all()
    joined = (target >= 0) & kept.gather(1, target.clamp(min=0))
    assert ((dest >= 0) == (is_kept_of(kept, candidates) | joined)).all()


def test_ragged_source_map_composes_and_skips_padding():
    from tmcore.plan import pack

    # sample 0 keeps 3 of 4 tokens (token 3 merges into token 1); sample 1 keeps 2 (2 and 3 pruned)
    kept = torch.tensor([[True, True, True, False], [True, True, False, False]])
    plan = pack(
        torch.arange(4), kept, 4, torch.arange(4).expand(2, 4), torch.tensor([[-1, -1, -1, 1], [-1, -1, -1, -1]])
    )
    assert plan.keep.tolist() == [[0, 1, 2], [0, 1, 0]] and plan.valid.tolist() == [[True] * 3, [True, True, False]]
    source = compose_source(identity_source(2, 4), plan)
    assert source.tolist() == [[0, 1, 2, 1], [0, 1, -1, -1]]
    assert source_matrix(source, 3).sum(2).tolist() == [[1, 2, 1], [1, 1, 0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sizes_count_exactly_in_half_precision(dtype):
    """Sizes are counted in float32 whatever the tokens' dtype: bfloat16 holds integers exactly
    only up to 256, so a group of 1,021 tokens weighed 1,020 and a 1,025-token input's sizes
    added up to 1,021."""
    x = torch.randn(2, 1025, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    size = None
    while x.shape[1] > 3:
        plan = tmcore.bipartite_soft_matching(x.float(), (x.shape[1] - 1) // 2, 1)
        x, size = tmcore.merge_tokens(x, plan, size)
        assert x.dtype == dtype and size.dtype == torch.float32
    assert size.sum(1).flatten().tolist() == [1025.0, 1025.0]
    assert size.max() > 256  # the groups are larger than half precision counts
    pooled = tmcore.pooling.mean_pool(x, None, size)
    assert pooled.dtype == dtype and torch.isfinite(pooled).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_reports_sizes_that_add_up(dtype):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=2, in_chans=1, embed_dim=16, depth=10, num_heads=2, num_classes=3
    )
    model = model.to(dtype).eval()
    tmcore.apply(model, "tome", r=[512 >> i for i in range(10)])  # the most each block can merge
    with torch.no_grad(), tmcore.trace(model) as t:
        out = model(torch.randn(2, 1, 64, 64).to(dtype))
    assert t.token_counts[0] == 1025 and out.dtype == dtype
    assert t.sizes.dtype == torch.float32 and t.sizes.sum(1).flatten().tolist() == [1025.0, 1025.0]
    assert t.sizes.max() > 256
