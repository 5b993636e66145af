"""Hypothesis strategies for merge invariants."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from tmcore.matching import max_bipartite_r


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
