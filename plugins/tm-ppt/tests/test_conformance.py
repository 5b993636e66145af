import math

from tmcore.testing import ReducerConformance


class TestPPTConformance(ReducerConformance):
    reducer = "ppt"
    # mixed (pool some images, prune others), all pooling, all pruning, plain-mean pooling
    configs = (
        {"r": 8, "layers": [0, 2], "threshold": 1e-3},
        {"r": [10, 6], "layers": [1, 3], "threshold": math.inf},
        {"r": 6, "layers": [0, 1, 2, 3], "threshold": 0.0},
        {"r": 7, "layers": [1, 2], "threshold": 5e-4, "prop_attn": False},
    )
