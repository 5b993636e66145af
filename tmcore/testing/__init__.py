"""Test kit for tmcore plugins: hypothesis strategies, tiny models and a conformance suite.

A third-party reducer gets the core's checks by subclassing the suite in its own tests::

    from tmcore.testing import ReducerConformance

    class TestMyReducer(ReducerConformance):
        reducer = "my_reducer"

and an adapter by subclassing `AdapterConformance` with ``adapter = "my_adapter"`` (its tiny
models come from ``Adapter.tiny_models``).
"""

from tmcore.testing.conformance import (
    AdapterConformance,
    ReducerConformance,
    run,
    tiny_models,
    tiny_timm_models,
)
from tmcore.testing.padding import assert_padded_equals_unpadded, right_padding
from tmcore.testing.strategies import matching_cases, mixed_cases

__all__ = [
    "AdapterConformance",
    "ReducerConformance",
    "assert_padded_equals_unpadded",
    "matching_cases",
    "mixed_cases",
    "right_padding",
    "run",
    "tiny_models",
    "tiny_timm_models",
]
