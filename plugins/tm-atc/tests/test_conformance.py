import pytest

from tmcore.testing import ReducerConformance


class TestATCConformance(ReducerConformance):
    reducer = "atc"
    # each linkage, proportional attention on and off in both schemes, a capped off-the-shelf r
    # the first, the one compiled on every model, unrolls few merge steps (13)
    configs = (
        {"keep_rate": 0.9, "layers": [1, 3]},
        {"keep_rate": 0.5, "linkage": "complete", "prop_attn": True},
        {"keep_rate": 0.6, "layers": [0, 2], "linkage": "single"},
        {"r": 6, "linkage": "single"},
        {"r": [30, 20, 10], "prop_attn": False},
    )

    @pytest.mark.slow  # dynamo traces every merge step (unrolled): several seconds per tiny model
    def test_compiles_and_equals_eager(self, model, request):
        super().test_compiles_and_equals_eager(model, request)
