from tmcore.testing import ReducerConformance


class TestLTMPConformance(ReducerConformance):
    reducer = "ltmp"
    configs = (
        {"merge_threshold": 0.6, "prune_threshold": 0.004},
        {"merge_threshold": [0.55, 0.6, 0.7, 0.8], "prune_threshold": [0.0, 0.014, 0.015, 0.0155]},
        {"mode": "prune_merge", "merge_threshold": 0.6, "prune_threshold": 0.0152},
        {"mode": "merge", "merge_threshold": 0.5},
        # block 0 prunes the ~65-token vision models, block 1 the 60-token text ones (importance ~ 1 / N)
        {"mode": "prune", "prune_threshold": [0.01536, 0.017, 0.0, 0.0]},
    )
