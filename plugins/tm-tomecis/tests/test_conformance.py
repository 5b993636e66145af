from tmcore.testing import ReducerConformance


class TestToMeCISConformance(ReducerConformance):
    reducer = "tomecis"
    configs = ({"r": 3}, {"r": [8, 4, 2]}, {"r": (4, -1)}, {"r": 6, "prop_attn": False})
