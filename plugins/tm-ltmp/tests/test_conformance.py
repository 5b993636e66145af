from tmcore.testing import ReducerConformance


class TestLTMPConformance(ReducerConformance):
    reducer = "ltmp"
    configs = (
        {"merge_threshold": 0.6, "prune_threshold": 0.004},
        {"merge_threshold": [0.55, 0.6, 0.7, 0.8], "prune_threshold": [0.0, 0.014, 0.015, 0.0155]},
        {"mode": "prune_merge", "merge_threshold": 0.6, "prune_threshold": 0.0152},
        {"mode": "merge", "merge_threshold": 0.5},
        {"mode": "prune", "prune_threshold": 0.01536},
    )
