import pytest

from tmcore.testing import ReducerConformance

pytestmark = pytest.mark.slow  # every tiny model x four configs: minutes


class TestDiffRateConformance(ReducerConformance):
    reducer = "diffrate"
    configs = (
        # first: checkpointing, backward and deep copies run the search's soft-mask block
        {"prune": [60, 48, 40, 30], "merge": [52, 40, 30, 20], "search": True, "prune_granularity": 3},
        {"prune": [64, 50, 50, 40], "merge": [64, 50, 50, 40]},  # prune only
        {"prune": 100, "merge": [50, 40, 60, 20]},  # merge only; counts above the length clip
        {"prune": [63, 63, 30, 3], "merge": [40, 40, 20, 3]},  # repeated counts: re-order only
    )
