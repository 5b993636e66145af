"""The batched clustering against scikit-learn's, its invariants, and padded batches against
their samples alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tm_atc.cluster import (
    LINKAGES,
    agglomerate,
    closest_pairs,
    cluster_plan,
    cosine_distances,
    padded_cluster_plan,
    representatives,
)
from tmcore.plan import destinations, merge_tokens
from tmcore.testing.padding import (
    assert_blocks_equal_samples,
    assert_padded_equals_unpadded,
    block_matcher,
    make_reducer,
    right_padding,
)
from tmcore.testing.strategies import padded_batches

sklearn_cluster = pytest.importorskip("sklearn.cluster")

# an r beyond a short sample's tokens is capped (all but one), with a warning, as the method says
pytestmark = pytest.mark.filterwarnings("ignore::tmcore.ScheduleClampWarning")


def partition(label: list[int]) -> list[tuple[int, ...]]:
    """Groups of positions with equal labels, whatever the label numbers."""
    groups: dict[int, list[int]] = {}
    for position, value in enumerate(label):
        groups.setdefault(int(value), []).append(position)
    return sorted(tuple(g) for g in groups.values())


def sklearn_partition(dist: torch.Tensor, k: int, linkage: str) -> list[tuple[int, ...]]:
    """What the official code computes per image: scikit-learn on the precomputed matrix."""
    d = dist.clone().fill_diagonal_(0).numpy()
    model = sklearn_cluster.AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage)
    return partition(model.fit(d).labels_.tolist())


def random_distances(gen: torch.Generator, b: int, t: int, cosine: bool) -> torch.Tensor:
    """``[B, T, T]`` float64 symmetric distances without ties: ``1 - cos`` of random features, or
    independent uniform entries (not a metric: average / complete linkage must not care)."""
    if cosine:
        return cosine_distances(torch.randn(b, t, 8, generator=gen, dtype=torch.float64))
    upper = torch.rand(b, t, t, generator=gen, dtype=torch.float64).triu(1)
    return upper + upper.transpose(1, 2)


@settings(max_examples=60, deadline=None)
@given(
    linkage=st.sampled_from(LINKAGES),
    t=st.integers(2, 40),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
    cosine=st.booleans(),
)
def test_partition_equals_sklearn(linkage, t, data, seed, cosine):
    k = data.draw(st.integers(1, t), label="k")
    dist = random_distances(torch.Generator().manual_seed(seed), 3, t, cosine)
    label = agglomerate(dist, t - k, linkage)
    for b in range(3):
        assert partition(label[b].tolist()) == sklearn_partition(dist[b], k, linkage), f"sample {b}"


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize(("t", "k"), [(196, 176), (196, 49), (49, 12), (12, 3)])
def test_deit_sizes_equal_sklearn(linkage, t, k):
    # the official DeiT counts (keep rates 0.9 and 0.25 from 196 patches) on cosine distances
    dist = random_distances(torch.Generator().manual_seed(t + k), 2, t, cosine=True)
    label = agglomerate(dist, t - k, linkage)
    for b in range(2):
        assert partition(label[b].tolist()) == sklearn_partition(dist[b], k, linkage)


def test_linkages_differ():
    # the three rules must not collapse into one: on one input, three different partitions
    dist = random_distances(torch.Generator().manual_seed(3), 1, 30, cosine=True)
    parts = {linkage: partition(agglomerate(dist, 22, linkage)[0].tolist()) for linkage in LINKAGES}
    assert len({tuple(p) for p in parts.values()}) == 3


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 30), p=st.integers(0, 3), data=st.data(), linkage=st.sampled_from(LINKAGES))
def test_plan_invariants(t, p, data, linkage):
    k = data.draw(st.integers(1, t), label="k")
    gen = torch.Generator().manual_seed(t * 31 + k)
    keys = torch.randn(2, p + t, 6, generator=gen, dtype=torch.float64)
    label = agglomerate(cosine_distances(keys[:, p:]), t - k, linkage)
    rep = representatives(label)
    assert (rep.sum(1) == k).all(), "K clusters per sample"
    assert (label <= torch.arange(t)).all(), "a cluster is named by its smallest position"
    plan = cluster_plan(label, k, p)
    assert plan.num_out == p + k
    dest = destinations(plan)
    assert (dest >= 0).all(), "every token lands in exactly one cluster"
    assert torch.equal(dest[:, :p], torch.arange(p).expand(2, p)), "protected tokens stay alone, in front"
    assert torch.equal(dest[:, p:], p + rep.cumsum(1).gather(1, label) - 1), "clusters by smallest position"
    counts = torch.zeros(2, p + k, dtype=torch.long).scatter_add_(1, dest, torch.ones_like(dest))
    assert (counts[:, :p] == 1).all()
    x, size = merge_tokens(keys, plan, None)
    assert torch.equal(size.squeeze(-1), counts.double())
    # each cluster is the mean of its members
    for b in range(2):
        for slot in range(p + k):
            torch.testing.assert_close(x[b, slot], keys[b][dest[b] == slot].mean(0))


def test_ties_go_by_position():
    # three identical tokens and a far one: the first pair by position merges first
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    dist = cosine_distances(x)
    i, j = closest_pairs(dist)
    assert (i.item(), j.item()) == (0, 1)
    assert agglomerate(dist, 2, "average")[0].tolist() == [0, 0, 0, 3]
    assert agglomerate(dist, 1, "single")[0].tolist() == [0, 0, 2, 3]


def test_padding_never_joins_real_tokens():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 13, 4, generator=gen, dtype=torch.float64)  # a class token, 12 others
    keys[1, 8:] = keys[1, 1]  # padding identical to a real token must still stay out
    valid = right_padding([13, 8, 4], 13)
    real = valid[:, 1:]
    label = agglomerate(cosine_distances(keys[:, 1:], real), 8, "average", torch.tensor([8, 5, 2]))
    assert torch.equal(label[~real], torch.arange(12).expand(3, 12)[~real]), "padding is its own"
    assert (representatives(label) & real).sum(1).tolist() == [4, 2, 1]
    plan = padded_cluster_plan(label, valid, 1, 1 + 4)
    assert plan.valid.sum(1).tolist() == [5, 3, 2]
    dest = destinations(plan)
    assert (dest[~valid] < 0).all() or not plan.valid.gather(1, dest.clamp(min=0))[~valid].any()
    assert (dest[valid] >= 0).all() and plan.valid.gather(1, dest.clamp(min=0))[valid].all()


@settings(max_examples=40, deadline=None)
@given(p=st.integers(0, 2), n=st.integers(3, 26), keep_rate=st.floats(0.2, 1.0), data=st.data())
def test_padded_block_equals_unpadded(p, n, keep_rate, data):
    # ties included (identical tokens in half the draws): decided by position, padded or not
    assume(int((n - p) * keep_rate) >= 1)  # else refused: no cluster left at the model's own size
    x, valid, size = data.draw(padded_batches(n, max(p, 1)), label="batch")
    reducer = make_reducer(
        "atc", p, 1, n, keep_rate=keep_rate, layers=[0], linkage=data.draw(st.sampled_from(LINKAGES))
    )
    assert_padded_equals_unpadded(block_matcher(reducer, keys_only=True), x, valid, size)


@settings(max_examples=30, deadline=None)
@given(p=st.integers(0, 2), n=st.integers(3, 26), r=st.integers(1, 12), data=st.data())
def test_padded_block_equals_unpadded_r(p, n, r, data):
    x, valid, size = data.draw(padded_batches(n, max(p, 1)), label="batch")
    reducer = make_reducer("atc", p, 1, n, r=[r], linkage=data.draw(st.sampled_from(LINKAGES)))
    assert_padded_equals_unpadded(block_matcher(reducer, keys_only=True), x, valid, size)


@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize(
    "config",
    [
        {"keep_rate": 0.6, "layers": [0, 1, 3]},
        {"keep_rate": 0.3, "layers": [1, 2], "linkage": "single", "prop_attn": True},
        {"r": [7, 3, 9, 5], "linkage": "complete"},
    ],
)
def test_every_block_equals_the_samples_alone(p, config):
    """Four blocks through the runtime: each sample's count follows its own input length (the
    keep rate's P, the cap of r) and its features and sizes equal its run alone."""
    reducer = make_reducer("atc", p, num_layers=4, num_tokens=24, **config)
    x = torch.randn(6, 24, 6, generator=torch.Generator().manual_seed(p), dtype=torch.float64)
    lengths = [24, 17, 9, p + 3, p + 1, max(p, 1)]
    _, counts = assert_blocks_equal_samples(reducer, x, lengths)
    assert any(not isinstance(c, int) and len(set(c.tolist())) > 2 for c in counts), "counts differ per sample"
