"""Block scope in the core (`tmcore.reducer.SCOPES`): block grids, the runtime's merge / unmerge
around sub-layers, what it refuses, and the invariants of merge-then-unmerge."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from hypothesis import given

import tmcore
from tmcore import BaseReducer, ModelInfo, Plan, PluginError, Runtime, Scores
from tmcore.plan import destinations, merge_tokens, spread
from tmcore.runtime import block_grid
from tmcore.testing import matching_cases


@pytest.mark.parametrize(
    ("grid", "tokens", "expected"),
    [
        ((64, 64), 4096, (64, 64, 1)),
        ((64, 64), 1024, (32, 32, 2)),
        ((64, 64), 64, (8, 8, 8)),
        ((96, 128), 768, (24, 32, 4)),  # SD at 768 x 1024
        ((65, 63), 33 * 32, (33, 32, 2)),  # odd latents: stride-2 convolutions round up
        ((8, 8), 10, None),  # no grid holds 10 tokens
        (None, 64, None),
    ],
)
def test_block_grid(grid, tokens, expected):
    assert block_grid(grid, tokens) == expected


class Halves(BaseReducer):
    """A block-scope reducer for the runtime's tests: merges token 2i + 1 into token 2i."""

    name: ClassVar[str] = "halves"
    requires = frozenset()
    scopes = frozenset({"block"})
    drop = False

    def needs(self, layer):
        return frozenset()

    def score(self, layer, inputs, state):
        return Scores(metric=inputs.tokens)

    def match(self, layer, scores, state):
        b, n, _ = scores.metric.shape
        keep = torch.arange(0, n, 2).expand(b, -1)
        src = torch.arange(1, n, 2).expand(b, -1)
        dst = torch.arange(n // 2).expand(b, -1)
        return Plan(keep, src, torch.full_like(dst, -1) if self.drop else dst, n)


def open_runtime(reducer_cls=Halves, sublayers=None):
    info = ModelInfo(family="test", num_layers=2, num_tokens=16, num_protected=0, scope="block", grid=(4, 4))
    reducer = reducer_cls(tmcore.ReducerConfig(), info)
    if sublayers is not None:
        reducer.sublayers = sublayers
    runtime = Runtime(reducer, info)
    runtime.begin(grid=(4, 4))
    return runtime


def test_merge_and_unmerge_around_a_sublayer():
    runtime = open_runtime()
    x = torch.randn(2, 16, 3, dtype=torch.float64)
    state = runtime.open_block(0, x)
    assert (state.block.grid, state.block.downsample) == ((4, 4), 1)
    h = x * 2
    merged, bias = runtime.merge(0, "attn", h)
    assert merged.shape == (2, 8, 3) and bias is None
    torch.testing.assert_close(merged, (h[:, 0::2] + h[:, 1::2]) / 2)
    out = runtime.unmerge(0, "attn", merged)
    assert torch.equal(out[:, 0::2], merged) and torch.equal(out[:, 1::2], merged)
    # a sub-layer the reducer does not name runs on every token
    same, _ = runtime.merge(0, "mlp", h)
    assert same is h and runtime.unmerge(0, "mlp", same) is same
    assert runtime.close_block(0, x, state) is x
    state = runtime.open_block(1, x[:, :4])  # a coarser block: 2 x 2
    assert (state.block.grid, state.block.downsample) == ((2, 2), 2)
    runtime.end()


def test_a_plan_that_drops_tokens_is_refused():
    class Prune(Halves):
        def match(self, layer, scores, state):
            b, n, _ = scores.metric.shape
            return Plan.prune(torch.arange(0, n, 2).expand(b, -1), n)

    class Drop(Halves):
        drop = True  # src entries with src_dst = -1: a value, seen by the plan checks

    x = torch.randn(1, 16, 3)
    runtime = open_runtime(Prune)
    runtime.open_block(0, x)
    with pytest.raises(PluginError, match="must merge, not drop"):
        runtime.merge(0, "attn", x)
    runtime = open_runtime(Drop)
    previous = tmcore.check_plans(True)
    try:
        runtime.open_block(0, x)
        with pytest.raises(PluginError, match="drops"):
            runtime.merge(0, "attn", x)
    finally:
        tmcore.check_plans(previous)


def test_unknown_sublayers_are_a_plugin_error():
    with pytest.raises(PluginError, match="sublayers"):
        open_runtime(sublayers=frozenset({"attn", "norm"}))


def test_merge_outside_a_block_is_an_error():
    runtime = open_runtime()
    with pytest.raises(tmcore.TmcoreError, match="outside its block"):
        runtime.merge(0, "attn", torch.randn(1, 16, 3))


@given(matching_cases())
def test_unmerged_groups_carry_their_mean(case):
    """Merge (plain mean) then unmerge: every token holds its group's mean, so each group's sum and
    the sum over all tokens are what they were."""
    if case.r == 0:
        return
    plan = tmcore.bipartite_soft_matching(case.metric, case.r, case.num_protected)
    merged, _ = merge_tokens(case.x, plan, None)
    out = spread(merged, destinations(plan), pruned=False)
    assert out.shape == case.x.shape
    torch.testing.assert_close(out.sum(1), case.x.sum(1), rtol=1e-9, atol=1e-9)
    dest = destinations(plan)
    same_group = dest.unsqueeze(2) == dest.unsqueeze(1)  # [B, N, N]
    torch.testing.assert_close(
        out.unsqueeze(2).expand(-1, -1, out.shape[1], -1)[same_group],
        out.unsqueeze(1).expand(-1, out.shape[1], -1, -1)[same_group],
    )
