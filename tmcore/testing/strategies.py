"""Hypothesis strategies for merge invariants: whole matching problems (`matching_cases`,
`mixed_cases`, `padded_batches`) and the pieces a plugin's own property tests combine (`tokens`,
`sizes`, `padding_masks`, `protected_prefixes`, `plans`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from tmcore.matching import max_bipartite_r
from tmcore.plan import Plan


@dataclass
class MatchingCase:
    """A random matching problem: ``metric [B, N, d]``, features ``x [B, N, C]``, sizes
    ``[B, N, 1]`` (positive integers), ``r`` tokens to remove and ``p`` protected tokens."""

    metric: torch.Tensor
    x: torch.Tensor
    size: torch.Tensor
    r: int
    num_protected: int


@st.composite
def matching_cases(
    draw: st.DrawFn,
    max_batch: int = 3,
    max_tokens: int = 40,
    max_protected: int = 5,
    duplicates: bool = True,
) -> MatchingCase:
    """Matching problems with random shapes, protected prefixes and ``r`` up to the 50 % limit.

    With ``duplicates`` some tokens are exact copies of others (ties in similarity), the case
    where order-dependent implementations disagree.
    """
    b = draw(st.integers(1, max_batch))
    p = draw(st.integers(0, max_protected))
    n = draw(st.integers(p + 2, max(p + 2, max_tokens)))
    d = draw(st.integers(2, 8))
    c = draw(st.integers(1, 6))
    r = draw(st.integers(0, max_bipartite_r(n, p)))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    metric = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    if duplicates and draw(st.booleans()):
        src = torch.randint(0, n, (n,), generator=gen)
        copy = torch.rand(n, generator=gen) < 0.3
        metric[:, copy] = metric[:, src[copy]]
    x = torch.randn(b, n, c, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 5, (b, n, 1), generator=gen).to(torch.float64)
    return MatchingCase(metric=metric, x=x, size=size, r=r, num_protected=p)


@dataclass
class MixedCase:
    """A fixed-shape mixed problem: every sample removes ``r`` tokens, by bipartite merging where
    ``take_merge`` ``[B]`` is set and by dropping its ``r`` lowest-``score`` ``[B, N]`` tokens
    elsewhere; ``weight`` ``[B, N, 1]`` is a positive per-token merge weight."""

    case: MatchingCase
    score: torch.Tensor
    take_merge: torch.Tensor
    weight: torch.Tensor


@st.composite
def mixed_cases(draw: st.DrawFn, max_batch: int = 4, max_tokens: int = 40, max_protected: int = 5) -> MixedCase:
    """`matching_cases` plus per-sample merge / drop choices, tie-free drop scores and weights."""
    case = draw(matching_cases(max_batch=max_batch, max_tokens=max_tokens, max_protected=max_protected))
    b, n = case.metric.shape[:2]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    score = torch.rand(b, n, generator=gen, dtype=torch.float64)
    take = torch.tensor(draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    weight = torch.rand(b, n, 1, generator=gen, dtype=torch.float64) + 0.1
    return MixedCase(case=case, score=score, take_merge=take, weight=weight)


@st.composite
def padded_batches(
    draw: st.DrawFn, num_tokens: int, min_length: int = 1, channels: int = 4, max_batch: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [B, N, C], valid [B, N], size [B, N, 1])``: a right-padded batch of 1 to ``max_batch``
    samples of random lengths (at least ``min_length``), float64 tokens, integer sizes, and in
    about half the draws exact ties: every third token a copy of the first, so only position can
    decide between them (in a batch and padded exactly as alone)."""
    lengths = draw(st.lists(st.integers(min_length, num_tokens), min_size=1, max_size=max_batch), label="lengths")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="seed"))
    x = torch.randn(len(lengths), num_tokens, channels, generator=gen, dtype=torch.float64)
    if draw(st.booleans(), label="ties"):
        x[:, 1::3] = x[:, :1]
    size = torch.randint(1, 4, (len(lengths), num_tokens, 1), generator=gen).double()
    return x, torch.arange(num_tokens) < torch.tensor(lengths).unsqueeze(1), size


# -- building blocks: tensors a reducer sees, and plans it may return ------------------------------


@st.composite
def protected_prefixes(draw: st.DrawFn, num_tokens: int, max_protected: int = 5) -> int:
    """A protected prefix length ``p`` for ``num_tokens`` tokens: ``0 <= p <= min(max, N - 1)``
    (class, distillation and register tokens; ``0`` for models pooled by averaging)."""
    return draw(st.integers(0, max(0, min(max_protected, num_tokens - 1))))


@st.composite
def tokens(
    draw: st.DrawFn, batch: int | None = None, num_tokens: int | None = None, channels: int | None = None
) -> torch.Tensor:
    """``[B, N, C]`` float64 tokens (random shapes where not given; some samples share values,
    the ties order-dependent code gets wrong)."""
    b = batch if batch is not None else draw(st.integers(1, 3))
    n = num_tokens if num_tokens is not None else draw(st.integers(2, 40))
    c = channels if channels is not None else draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(b, n, c, generator=gen, dtype=torch.float64)
    if n > 1 and draw(st.booleans()):
        x[:, 1] = x[:, 0]
    return x


@st.composite
def sizes(draw: st.DrawFn, batch: int, num_tokens: int, max_size: int = 8) -> torch.Tensor:
    """``[B, N, 1]`` float64 token sizes: positive integers (tokens merged earlier stand for several)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randint(1, max_size + 1, (batch, num_tokens, 1), generator=gen).to(torch.float64)


@st.composite
def padding_masks(draw: st.DrawFn, batch: int, num_tokens: int, min_real: int = 1) -> torch.Tensor:
    """``[B, N]`` bool right-padding masks (real tokens first), at least ``min_real`` real tokens
    per sample and the longest sample unpadded, as a tokenizer pads a batch."""
    lengths = draw(st.lists(st.integers(min(min_real, num_tokens), num_tokens), min_size=batch, max_size=batch))
    lengths[draw(st.integers(0, batch - 1))] = num_tokens
    return torch.arange(num_tokens) < torch.tensor(lengths).unsqueeze(1)


@st.composite
def plans(draw: st.DrawFn, batch: int, num_tokens: int, num_protected: int = 0) -> Plan:
    """Fixed-shape plans on ``num_tokens`` tokens that keep the protected prefix in front: per
    sample, a random ``r`` of the other tokens either merge into kept ones (bipartite, on random
    keys) or are dropped, in one plan (`tmcore.plan.select`)."""
    from tmcore.matching import bipartite_soft_matching, prune_lowest
    from tmcore.plan import select

    r = draw(st.integers(0, max_bipartite_r(num_tokens, num_protected)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    keys = torch.randn(batch, num_tokens, 4, generator=gen, dtype=torch.float64)
    score = torch.rand(batch, num_tokens, generator=gen, dtype=torch.float64)
    merge = bipartite_soft_matching(keys, r, num_protected)
    prune = prune_lowest(score, r, num_protected)
    take_merge = torch.tensor(draw(st.lists(st.booleans(), min_size=batch, max_size=batch)))
    return select(take_merge, merge, prune)
