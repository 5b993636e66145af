"""The pytest plugin of ``tmcore[testing]`` (entry point ``pytest11``): fixtures for the tiny
models of every installed adapter family, so a plugin's own tests run on all of them::

    def test_my_reducer_keeps_the_class_token(tiny_model, tiny_inputs):   # one test per model
        tmcore.apply(tiny_model, "mymethod", r=4)
        ...

It imports nothing heavy until a test asks for a fixture (it is loaded in every pytest run of an
environment that has tmcore installed).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest


def _tiny_models() -> dict[str, Callable[[], Any]]:
    from tmcore.testing.conformance import tiny_models

    return tiny_models()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tiny_model" in metafunc.fixturenames:
        metafunc.parametrize("tiny_model", sorted(_tiny_models()), indirect=True)


@pytest.fixture(scope="session")
def tmcore_tiny_models() -> dict[str, Callable[[], Any]]:
    """``"adapter:name"`` -> a factory of a small float64 model in eval mode, for every installed
    adapter (`tmcore.Adapter.tiny_models`)."""
    return _tiny_models()


@pytest.fixture
def tiny_model(request: pytest.FixtureRequest) -> Any:
    """A fresh tiny model of one installed adapter family; tests that take it run once per model
    (ids ``"timm:vit"``, ``"transformers:bert"``, ...)."""
    return _tiny_models()[request.param]()


@pytest.fixture
def tiny_inputs(tiny_model: Any) -> dict[str, Any]:
    """Keyword arguments for ``tiny_model(**tiny_inputs)``: images, or padded sentences with their
    ``attention_mask`` for text models (`tmcore.Adapter.example_inputs`)."""
    from tmcore.registry import registry

    return registry.adapter_for(tiny_model).example_inputs(tiny_model)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What the conformance suite measured of adaptive reducers (host syncs, compiled graphs)."""
    conformance = sys.modules.get("tmcore.testing.conformance")
    report = getattr(conformance, "REPORT", None)
    if report:
        terminalreporter.section("tmcore: what adaptive reducers cost per forward")
        for line in dict.fromkeys(report):
            terminalreporter.write_line(line)
