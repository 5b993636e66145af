"""Plans from plugins are checked at the boundary: what types and shapes tell on every plan (no
host synchronisation), the values under `tmcore.check_plans`, and no gather reads across
samples whatever a plan holds."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import tmcore
from tmcore import BaseReducer, ModelInfo, Plan, PluginError, ReducerConfig, Runtime
from tmcore.matching import bipartite_soft_matching
from tmcore.plan import merge_tokens, plan_problems, plan_value_problems, reduce, select

INFO = ModelInfo(family="test", num_layers=2, num_tokens=9, num_protected=1, class_token=True)


class _Returns(BaseReducer):
    """Returns ``make(keys)`` as its plan in every block: a third-party reducer's plan."""

    name = "returns"
    requires = frozenset()
    make = staticmethod(lambda keys: None)

    def score(self, layer, inputs, state):
        return inputs.tokens  # the tokens as the metric: nothing to capture

    def match(self, layer, keys, state):
        return self.make(keys)


def _step(make, x, layer=0):
    """One block of a runtime whose reducer returns ``make(keys)``: the step's output."""
    reducer = _Returns(ReducerConfig(), INFO)
    reducer.make = make
    runtime = Runtime(reducer, INFO)
    state = runtime.enter(layer, x)
    try:
        return runtime.step(layer, x, state, None, 1.0)
    finally:
        runtime.clear()


def _tome(keys, r=2):
    return bipartite_soft_matching(keys, r, 1)


def _x(b=2, n=9, c=4):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(b * n), dtype=torch.float64)


STRUCTURAL = [
    ("a tuple", lambda k: (_tome(k).keep,), "match() returned a tuple; allowed: a tmcore.Plan"),
    ("float indices", lambda k: dataclasses.replace(_tome(k), keep=_tome(k).keep.float()), "dtype torch.float32"),
    (
        "int32 indices",
        lambda k: dataclasses.replace(_tome(k), src=_tome(k).src.int()),
        "Plan.src has dtype torch.int32",
    ),
    ("another batch", lambda k: dataclasses.replace(_tome(k), keep=_tome(k).keep[:1]), "Plan.keep has shape (1, 7)"),
    ("one dim", lambda k: dataclasses.replace(_tome(k), keep=_tome(k).keep[0]), "Plan.keep has shape (7,)"),
    ("num_in", lambda k: dataclasses.replace(_tome(k), num_in=10), "Plan.num_in=10 for 9 input tokens"),
    ("num_in bool", lambda k: dataclasses.replace(_tome(k), num_in=True), "Plan.num_in=True"),
    (
        "grows",
        lambda k: Plan.prune(torch.arange(9).repeat(2).expand(k.shape[0], 18), 9),
        "18 output slots for 9 input tokens",
    ),
    ("no slot", lambda k: Plan.prune(k.new_zeros(k.shape[0], 0, dtype=torch.long), 9), "at least 1"),
    (
        "src_dst shape",
        lambda k: dataclasses.replace(_tome(k), src_dst=_tome(k).src_dst[:, :1]),
        "Plan.src_dst has shape (2, 1)",
    ),
    (
        "valid dtype",
        lambda k: dataclasses.replace(_tome(k), valid=torch.ones(k.shape[0], 7)),
        "Plan.valid is torch.float32; allowed: torch.bool",
    ),
    (
        "weight shape",
        lambda k: _tome(k).with_weight(torch.ones(k.shape[0], 7, 1, dtype=torch.float64)),
        "Plan.weight has shape (2, 7, 1); allowed: [2, 9, 1]",
    ),
    (
        "weight dtype",
        lambda k: _tome(k).with_weight(torch.ones(k.shape[0], 9, 1, dtype=torch.long)),
        "Plan.weight is torch.int64",
    ),
]


@pytest.mark.parametrize(("fault", "make", "words"), STRUCTURAL, ids=[f for f, _, _ in STRUCTURAL])
def test_structural_faults_fail_on_every_forward_naming_reducer_block_and_field(fault, make, words):
    assert not tmcore.check_plans(False)  # off: these need no values and no switch
    with pytest.raises(PluginError) as info:
        _step(make, _x(), layer=1)
    assert "reducer 'returns' returned an invalid plan in block 1" in str(info.value)
    assert words in str(info.value), str(info.value)


VALUES = [
    (
        "index N",
        lambda k: dataclasses.replace(_tome(k), keep=_tome(k).keep.index_fill(1, torch.tensor([6]), 9)),
        "Plan.keep holds 9",
    ),
    ("negative src", lambda k: dataclasses.replace(_tome(k), src=-_tome(k).src), "Plan.src holds -"),
    ("src_dst", lambda k: dataclasses.replace(_tome(k), src_dst=_tome(k).src_dst + 7), "Plan.src_dst holds"),
    (
        "duplicate",
        lambda k: dataclasses.replace(_tome(k), keep=_tome(k).keep.index_fill(1, torch.tensor([2]), 3)),
        "input token 3 is in more than one place",
    ),
    (
        "class token moved",
        lambda k: dataclasses.replace(_tome(k), keep=_tome(k).keep.flip(1)),
        "the protected prefix kept in place and in front",
    ),
    (
        "class token merged",
        lambda k: dataclasses.replace(_tome(k), src=_tome(k).src.index_fill(1, torch.tensor([0]), 0)),
        "protected tokens are never merged",
    ),
    (
        "zero weights",
        lambda k: _tome(k).with_weight(torch.zeros(k.shape[0], 9, 1, dtype=torch.float64)),
        "Plan.weight holds 0.0",
    ),
    (
        "nan weights",
        lambda k: _tome(k).with_weight(torch.full((k.shape[0], 9, 1), float("nan"), dtype=torch.float64)),
        "Plan.weight holds nan",
    ),
    (
        "padding first",
        lambda k: Plan.prune(torch.arange(9).expand(k.shape[0], 9), 9, valid=torch.arange(9).expand(k.shape[0], 9) > 0),
        "a padding slot before a real one",
    ),
]


@pytest.mark.parametrize(("fault", "make", "words"), VALUES, ids=[f for f, _, _ in VALUES])
def test_value_faults_fail_under_check_plans_naming_the_field(fault, make, words):
    x = _x()
    plan = make(x)
    assert plan_problems(plan, 2, 9, 1, x.device) == []  # nothing the shapes tell
    assert any(words in p for p in plan_value_problems(plan, 1)), plan_value_problems(plan, 1)
    previous = tmcore.check_plans(True)
    try:
        with pytest.raises(PluginError, match="reducer 'returns' returned an invalid plan in block 0"):
            _step(make, x)
    finally:
        tmcore.check_plans(previous)


def test_the_core_plans_hold_valid_values():
    x = _x(3, 11)
    valid = torch.arange(11) < torch.tensor([[11], [6], [3]])
    mixed = select(torch.tensor([True, False, True]), _tome(x, 3), tmcore.matching.prune_lowest(x[..., 0], 3, 1))
    for plan, v in ((_tome(x, 3), None), (bipartite_soft_matching(x, 3, 1, valid), valid), (mixed, None)):
        assert plan_problems(plan, 3, 11, 1, x.device) == [] and plan_value_problems(plan, 1, v) == []


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_an_out_of_range_index_fails_and_never_reads_the_next_sample(batch):
    """Index ``N`` in the last slot of sample 0: the flat gather (``index + b * N``) would read
    sample 1's first token. It fails instead, as a PluginError naming the reducer, at every batch
    size (at batch 1 it used to be a bare IndexError), with the value checks off."""
    x = _x(batch)

    def leak(keys):
        plan = _tome(keys)
        keep = plan.keep.clone()
        keep[0, -1] = keys.shape[1]
        return dataclasses.replace(plan, keep=keep)

    tmcore.check_plans(False)
    with pytest.raises(PluginError, match="reducer 'returns' failed to apply its plan in block 0"):
        _step(leak, x)
    for bad in (9, -1, 12):  # at plan level: a torch error, never a result
        plan = _tome(x)
        keep = plan.keep.clone()
        keep[0, -1] = bad
        with pytest.raises((IndexError, RuntimeError)):
            merge_tokens(x, dataclasses.replace(plan, keep=keep), None)
        src_dst = plan.src_dst.clone()
        src_dst[0, 0] = -2 if bad < 0 else plan.num_out  # only -1 means dropped
        with pytest.raises((IndexError, RuntimeError)):
            reduce(x, dataclasses.replace(plan, src_dst=src_dst))


def test_check_plans_from_the_environment():
    code = "import tmcore; assert tmcore.check_plans(False) is True; assert tmcore.check_plans() is False"
    env = {**os.environ, "TMCORE_CHECK_PLANS": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
