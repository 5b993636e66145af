"""The published test kit (``tmcore[testing]``): its pytest plugin's fixtures, its hypothesis
strategies, and the conformance suite catching broken reducers by the invariant they break."""

from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tmcore.plan import compose_source, identity_source
from tmcore.testing import padding_masks, plans, protected_prefixes, sizes, tokens


def test_tiny_model_fixture_runs_every_installed_family(tiny_model, tiny_inputs):
    with torch.no_grad():
        out = tiny_model(**tiny_inputs)
    assert out is not None


def test_tiny_models_cover_every_installed_adapter(tmcore_tiny_models):
    import tmcore

    families = {name.split(":")[0] for name in tmcore_tiny_models}
    assert families == set(tmcore.adapters())


@given(st.data())
def test_strategies_make_what_they_say(data):
    x = data.draw(tokens())
    b, n, _ = x.shape
    p = data.draw(protected_prefixes(n))
    size = data.draw(sizes(b, n))
    valid = data.draw(padding_masks(b, n))
    plan = data.draw(plans(b, n, p))
    assert 0 <= p < max(n, 1) and (size >= 1).all() and size.shape == (b, n, 1)
    assert valid.any(1).all() and valid.all(1).any() and not (valid[:, 1:] & ~valid[:, :-1]).any()
    source = compose_source(identity_source(b, n), plan)
    assert torch.equal(source[:, :p], torch.arange(p).expand(b, p))  # the prefix stays in front
    assert plan.keep.shape[1] == plan.num_out and plan.num_in == n


BROKEN = """
    import pytest
    import torch

    from tm_tome import ToMe
    from tmcore import Scores
    from tmcore.matching import bipartite_soft_matching
    from tmcore.registry import Registration, registry
    from tmcore.testing import ReducerConformance


    class LosesSize(ToMe):
        name = "loses_size"

        def reduce(self, x, plan, state):
            x, size = super().reduce(x, plan, state)
            return x, torch.ones_like(size)


    class MovesClassToken(ToMe):
        name = "moves_class_token"

        def match(self, layer, scores, state):
            return bipartite_soft_matching(scores.metric, 2, 0, state.valid)  # the prefix may merge


    class IgnoresPadding(ToMe):
        name = "ignores_padding"

        def match(self, layer, scores, state):
            return bipartite_soft_matching(scores.metric, 2, state.num_protected)  # no valid=: pads merge


    class DependsOnBatch(ToMe):
        name = "depends_on_batch"

        def score(self, layer, inputs, state):
            keys = inputs.keys
            return Scores(metric=keys - keys.mean(0))  # every sample's matching sees the others


    @pytest.fixture(autouse=True, scope="module")
    def registered():
        registry.ensure_loaded()
        classes = (LosesSize, MovesClassToken, IgnoresPadding, DependsOnBatch)
        for cls in classes:
            registry.reducers[cls.name] = Registration(cls.name, cls, "tm-broken", "0.0.0")
        yield
        for cls in classes:
            del registry.reducers[cls.name]


    class TestLosesSize(ReducerConformance):
        reducer = "loses_size"
        configs = ({"r": 2},)


    class TestMovesClassToken(ReducerConformance):
        reducer = "moves_class_token"
        configs = ({"r": 2},)


    class TestIgnoresPadding(ReducerConformance):
        reducer = "ignores_padding"
        configs = ({"r": 2},)


    class TestDependsOnBatch(ReducerConformance):
        reducer = "depends_on_batch"
        configs = ({"r": 2},)


    class TestControl(ReducerConformance):
        reducer = "tome"
        configs = ({"r": 2},)
"""


@pytest.mark.parametrize(
    ("broken", "test", "model", "words"),
    [
        ("TestLosesSize", "test_trace_invariants", "timm:vit", "sizes are not conserved"),
        ("TestMovesClassToken", "test_trace_invariants", "timm:vit", "protected tokens moved"),
        ("TestIgnoresPadding", "test_trace_invariants", "transformers:bert", "padding could merge with real tokens"),
        ("TestDependsOnBatch", "test_batch_equals_samples", "timm:vit", "depends on the rest of its batch"),
    ],
)
def test_broken_reducers_fail_conformance_naming_the_invariant(pytester, broken, test, model, words):
    pytest.importorskip("timm")
    if model.startswith("transformers"):
        pytest.importorskip("transformers")
    pytester.makepyfile(test_broken=textwrap.dedent(BROKEN))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", f"test_broken.py::{broken}::{test}[{model}]")
    result.assert_outcomes(failed=1)
    assert words in result.stdout.str(), result.stdout.str()[-3000:]


def test_the_unbroken_reducer_passes_the_same_checks(pytester):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    pytester.makepyfile(test_broken=textwrap.dedent(BROKEN))
    tests = [
        "TestControl::test_trace_invariants[timm:vit]",
        "TestControl::test_trace_invariants[transformers:bert]",
        "TestControl::test_batch_equals_samples[timm:vit]",
    ]
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", *(f"test_broken.py::{t}" for t in tests))
    result.assert_outcomes(passed=3)


MALFORMED = """
    import dataclasses

    import pytest
    import torch

    from tm_tome import ToMe
    from tmcore.registry import Registration, registry
    from tmcore.testing import ReducerConformance


    def _n(plan):
        return plan.num_in


    FAULTS = {
        # what a third-party reducer gets wrong in the plan it returns
        "merges_the_class_token": lambda p: dataclasses.replace(
            p, keep=torch.cat([p.src[:, :1], p.keep[:, 1:]], 1), src=torch.cat([p.keep[:, :1], p.src[:, 1:]], 1)
        ),
        "duplicates_a_token": lambda p: dataclasses.replace(p, keep=torch.cat([p.keep[:, :-1], p.keep[:, -2:-1]], 1)),
        "grows_the_count": lambda p: dataclasses.replace(p, keep=torch.cat([p.keep, p.keep], 1)),
        "wrong_num_in": lambda p: dataclasses.replace(p, num_in=p.num_in + 1),
        "float_indices": lambda p: dataclasses.replace(p, keep=p.keep.float()),
        "another_batch_size": lambda p: dataclasses.replace(p, keep=p.keep[:1], src=p.src[:1], src_dst=p.src_dst[:1]),
        "zero_weights": lambda p: p.with_weight(torch.zeros(p.keep.shape[0], p.num_in, 1, dtype=torch.float64)),
        "reads_the_next_sample": lambda p: dataclasses.replace(
            p, keep=torch.cat([p.keep[:, :-1], torch.full_like(p.keep[:, -1:], _n(p))], 1)
        ),
    }


    def broken(fault):
        class Broken(ToMe):
            name = fault

            def match(self, layer, keys, state):
                plan = super().match(layer, keys, state)
                return None if plan is None else FAULTS[fault](plan)

        return Broken


    @pytest.fixture(autouse=True, scope="module")
    def registered():
        registry.ensure_loaded()
        for fault in FAULTS:
            registry.reducers[fault] = Registration(fault, broken(fault), "tm-broken", "0.0.0")
        yield
        for fault in FAULTS:
            del registry.reducers[fault]


    for fault in FAULTS:
        test = {"reducer": fault, "configs": ({"r": 2},)}
        globals()["Test_" + fault] = type("Test_" + fault, (ReducerConformance,), test)
"""


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("merges_the_class_token", "Plan.keep[:, :1] is"),
        ("duplicates_a_token", "is in more than one place"),
        ("grows_the_count", "output slots for"),
        ("wrong_num_in", "Plan.num_in="),
        ("float_indices", "Plan.keep has dtype torch.float32; allowed: torch.long"),
        ("another_batch_size", "Plan.keep has shape (1,"),
        ("zero_weights", "Plan.weight holds 0.0"),
        ("reads_the_next_sample", "Plan.keep holds"),
    ],
)
def test_malformed_plans_fail_conformance_naming_the_field(pytester, fault, words):
    """A third-party reducer per fault in its plans: the conformance suite's plan check fails it,
    naming the reducer, the block and the field (structural faults are caught on every forward,
    value faults under `tmcore.check_plans`, which the suite turns on)."""
    pytest.importorskip("timm")
    pytester.makepyfile(test_malformed=textwrap.dedent(MALFORMED))
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", f"test_malformed.py::Test_{fault}::test_plans_hold_valid_values[timm:vit]"
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert f"reducer '{fault}' returned an invalid plan in block" in out and words in out, out[-3000:]
