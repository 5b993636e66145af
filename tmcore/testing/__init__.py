"""Test kit for tmcore plugins: hypothesis strategies, tiny models and a conformance suite.

A third-party reducer gets the core's checks by subclassing the suite in its own tests::

    from tmcore.testing import ReducerConformance

    class TestMyReducer(ReducerConformance):
        reducer = "my_reducer"

and an adapter by subclassing `AdapterConformance` with ``adapter = "my_adapter"`` (its tiny
models come from ``Adapter.tiny_models``).

``pip install "tmcore[testing]"`` brings pytest and hypothesis and registers the pytest plugin
`tmcore.testing.pytest_plugin` (fixtures ``tiny_model``, ``tiny_inputs``, ``tmcore_tiny_models``);
`tmcore.testing.strategies` has hypothesis strategies for tokens, sizes, padding masks,
protected prefixes and plans.
"""

from tmcore.testing.conformance import (
    AdapterConformance,
    ReducerConformance,
    run,
    tiny_models,
    tiny_timm_models,
)
from tmcore.testing.padding import assert_padded_equals_unpadded, right_padding
from tmcore.testing.strategies import (
    matching_cases,
    mixed_cases,
    padding_masks,
    plans,
    protected_prefixes,
    sizes,
    tokens,
)

__all__ = [
    "AdapterConformance",
    "ReducerConformance",
    "assert_padded_equals_unpadded",
    "matching_cases",
    "mixed_cases",
    "padding_masks",
    "plans",
    "protected_prefixes",
    "right_padding",
    "run",
    "sizes",
    "tiny_models",
    "tiny_timm_models",
    "tokens",
]
