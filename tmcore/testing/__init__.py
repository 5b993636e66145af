"""Test kit for tmcore plugins: hypothesis strategies, tiny models and a conformance suite.

A third-party reducer gets the core's checks by subclassing the suite in its own tests::

    from tmcore.testing import ReducerConformance

    class TestMyReducer(ReducerConformance):
        reducer = "my_reducer"
"""

from tmcore.testing.conformance import ReducerConformance, tiny_timm_models
from tmcore.testing.strategies import matching_cases, mixed_cases

__all__ = ["ReducerConformance", "matching_cases", "mixed_cases", "tiny_timm_models"]
