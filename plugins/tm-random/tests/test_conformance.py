from tmcore.testing import ReducerConformance


class TestRandomConformance(ReducerConformance):
    reducer = "random"
    configs = ({"r": 5}, {"r": [20, 10, 5], "seed": 3}, {"r": (6, -1), "seed": 7}, {"r": 4, "prop_attn": True})
