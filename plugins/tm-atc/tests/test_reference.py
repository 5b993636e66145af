"""ATC against a reference written from the official algorithm in the official code's structure:
per image, scikit-learn's ``AgglomerativeClustering`` on the precomputed ``1 - cos`` matrix of the
head-mean keys of the patch tokens (class token left out), the class token as group 0 and cluster
``c`` as group ``c + 1``, a size-weighted scatter-sum merge, and, without proportional
attention, sizes dropped after every block. Compared in float64 on a random-init timm DeiT.

The official output order is scikit-learn's label order, tmcore's is by each cluster's smallest
token position: the class-token logits agree up to summation order, and the partitions of the
patches (compared as sets of groups) are equal.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tmcore
from tmcore.testing.reference import float64_timm, vit_forward

sklearn_cluster = pytest.importorskip("sklearn.cluster")
pytest.importorskip("timm")

TOL = {"rtol": 1e-9, "atol": 1e-9}


def official_labels(metric: torch.Tensor, num_clusters: int, linkage: str) -> torch.Tensor:
    """``[B, N]`` group of every token: 0 for the class token, ``1 + label`` for the patches."""
    b, n, _ = metric.shape
    num_clusters = min(num_clusters, n - 1)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    dist = (1 - unit @ unit.transpose(-1, -2))[:, 1:, 1:].numpy()
    model = sklearn_cluster.AgglomerativeClustering(n_clusters=num_clusters, metric="precomputed", linkage=linkage)
    labels = torch.stack([torch.from_numpy(model.fit(dist[i]).labels_) for i in range(b)]).long()
    return torch.cat([labels.new_zeros(b, 1), labels + 1], dim=1)


def merge_groups(x: torch.Tensor, size: torch.Tensor | None, groups: torch.Tensor, count: int):
    """The official ``merge_wavg`` with a general assignment: ``(x, size)`` per group."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    b, _, c = x.shape
    total = x.new_zeros(b, count, c).scatter_add(1, groups.unsqueeze(-1).expand(-1, -1, c), x * size)
    weight = size.new_zeros(b, count, 1).scatter_add(1, groups.unsqueeze(-1), size)
    return total / weight, weight


def reference_forward(model, images, clusters, linkage, prop_attn, on_features=False, r_variant=False, keep_sizes=None):
    """The official forward; ``clusters`` maps a block to its cluster count (fine-tuned scheme),
    or with ``r_variant`` to the official off-the-shelf ``r`` (``N - r`` clusters over the
    ``N - 1`` patches, sizes always kept, so merges are size-weighted whatever ``prop_attn``).
    Misreadings that must differ: ``on_features`` clusters the tokens instead of their keys;
    ``keep_sizes=True`` keeps sizes without proportional attention (no reset).

    Returns ``(logits, [B, N0] final group of every input token, token counts per block)``."""
    b = images.shape[0]
    source = torch.arange(1 + model.patch_embed.num_patches).expand(b, -1)
    counts = []
    keep_sizes = (prop_attn or r_variant) if keep_sizes is None else keep_sizes

    def reduce(layer, x, size, keys):
        nonlocal source
        counts.append(x.shape[1])
        # (one patch left: the official off-the-shelf patch would hand scikit-learn a single sample,
        # which it refuses; nothing can merge there)
        if layer in clusters and x.shape[1] > 2:
            n = x.shape[1]
            k = n - min(clusters[layer], n - 1) if r_variant else min(clusters[layer], n - 1)
            groups = official_labels(x if on_features else keys.mean(dim=1), k, linkage)
            source = groups.gather(1, source)
            x, size = merge_groups(x, size, groups, k + 1)
        return x, size if keep_sizes else None  # the official reset, without proportional attention

    with torch.no_grad():
        tokens, _ = vit_forward(model, images, reduce, prop_attn=prop_attn)
    counts.append(tokens.shape[1])
    return model.forward_head(tokens), source, counts


def run_tmcore(model, images, **config):
    tmcore.apply(model, "atc", replace=True, **config)
    with torch.no_grad(), tmcore.trace(model) as t:
        out = model(images)
    return out, t


def partitions(source: torch.Tensor) -> list[list[tuple[int, ...]]]:
    """Per image, the groups of input tokens that ended in one output token."""
    out = []
    for row in source.tolist():
        groups: dict[int, list[int]] = {}
        for position, slot in enumerate(row):
            groups.setdefault(slot, []).append(position)
        out.append(sorted(tuple(g) for g in groups.values()))
    return out


def official_counts(patches: int, keep_rate: float, layers: list[int]) -> dict[int, int]:
    """``int(P * k ** (i + 1))`` at the i-th listed block, as the official model computes them."""
    return {layer: int(patches * keep_rate ** (i + 1)) for i, layer in enumerate(layers)}


@pytest.fixture(scope="module")
def deit():
    # 6 x 6 patches and a class token, 12 blocks (the default blocks 3, 6, 9)
    return float64_timm("deit_tiny_patch16_224", depth=12, img_size=96, batch=3)


@pytest.mark.parametrize(
    ("linkage", "prop_attn", "keep_rate"),
    [("average", False, 0.4), ("complete", True, 0.5), ("single", False, 0.5), ("average", True, 0.7)],
)
def test_model_equals_reference(deit, linkage, prop_attn, keep_rate):
    model, images = deit
    clusters = official_counts(36, keep_rate, [3, 6, 9])
    ref, ref_source, ref_counts = reference_forward(model, images, clusters, linkage, prop_attn)
    out, t = run_tmcore(model, images, keep_rate=keep_rate, linkage=linkage, prop_attn=prop_attn)
    torch.testing.assert_close(out, ref, **TOL)
    assert [int(c) for c in t.token_counts] == ref_counts
    assert partitions(t.source) == partitions(ref_source)
    # output order: the class token, then clusters by their smallest position
    first = torch.full((3, t.sizes.shape[1]), 10**6).scatter_reduce(1, t.source, torch.arange(37).expand(3, 37), "amin")
    assert (first[:, 0] == 0).all() and (first[:, 1:].diff(dim=1) > 0).all()


def test_misreadings_differ(deit):
    model, images = deit
    clusters = official_counts(36, 0.7, [3, 6, 9])
    out, t = run_tmcore(model, images, keep_rate=0.7)
    # clustering the tokens instead of their keys
    features, _, _ = reference_forward(model, images, clusters, "average", False, on_features=True)
    assert not torch.allclose(out, features, rtol=1e-3, atol=1e-3)
    # compounding the keep rate on each block's count instead of on P: 25, 17, 11 instead of 25, 17, 12
    compounded = {3: 25, 6: int(25 * 0.7), 9: int(int(25 * 0.7) * 0.7)}
    assert compounded != clusters
    wrong, _, wrong_counts = reference_forward(model, images, compounded, "average", False)
    assert wrong_counts != [int(c) for c in t.token_counts]
    assert not torch.allclose(out, wrong, rtol=1e-3, atol=1e-3)
    # merging by size although the official code drops sizes without proportional attention
    sized, _, _ = reference_forward(model, images, clusters, "average", False, keep_sizes=True)
    assert not torch.allclose(out, sized, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("r", "linkage", "prop_attn"), [(4, "single", True), (3, "average", False)])
def test_r_equals_official_off_the_shelf_with_r_plus_one(deit, r, linkage, prop_attn):
    """The official off-the-shelf clustering asks for ``N - r`` clusters of the ``N - 1`` patches,
    so with a class token it removes ``r - 1`` tokens; tmcore's ``r`` removes ``r``, which is the
    official with ``r + 1`` (capped at one cluster: the official caps at ``N - 1``)."""
    model, images = deit
    ref, ref_source, ref_counts = reference_forward(
        model, images, dict.fromkeys(range(12), r + 1), linkage, prop_attn, r_variant=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tmcore.ScheduleClampWarning)  # the last blocks run out of tokens
        out, t = run_tmcore(model, images, r=r, linkage=linkage, prop_attn=prop_attn)
    torch.testing.assert_close(out, ref, **TOL)
    assert [int(c) for c in t.token_counts] == ref_counts
    assert ref_counts[:3] == [37, 37 - r, 37 - 2 * r] and ref_counts[-1] == 2
    assert partitions(t.source) == partitions(ref_source)


@pytest.mark.parametrize(
    ("keep_rate", "clusters"),
    [(0.9, [176, 158, 142]), (0.7, [137, 96, 67]), (0.5, [98, 49, 24]), (0.25, [49, 12, 3])],
)
def test_deit_token_counts(keep_rate, clusters):
    """The official DeiT schedule: 196 patches and a class token, blocks 3, 6, 9."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    out, t = run_tmcore(model, torch.randn(1, 3, 224, 224), keep_rate=keep_rate)
    expected = [197] * 4 + [1 + clusters[0]] * 3 + [1 + clusters[1]] * 3 + [1 + clusters[2]] * 3
    assert [int(c) for c in t.token_counts] == expected
    assert list(official_counts(196, keep_rate, [3, 6, 9]).values()) == clusters
