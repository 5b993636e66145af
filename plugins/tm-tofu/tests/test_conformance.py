from tmcore.testing import ReducerConformance


class TestToFuConformance(ReducerConformance):
    reducer = "tofu"
    # prune early / merge late (default switch), merge everywhere, prune everywhere, the
    # re-implementations' merge rule without proportional attention
    configs = (
        {"r": 3},
        {"r": [6, 4, 2], "switch": -1},
        {"r": 4, "switch": 0},
        {"r": (4, -1), "switch": -1, "merge_rule": "reimplementation", "prop_attn": False},
    )
