from tmcore.testing import ReducerConformance


class TestTopKConformance(ReducerConformance):
    reducer = "topk"
    configs = (
        {"keep_rate": 0.7},
        {"keep_rate": 0.5, "layers": [0, 2]},
        {"keep_rate": 0.8, "layers": [0, 1, 2, 3], "prop_attn": True},
    )


class TestTopKWithoutFusionConformance(ReducerConformance):
    """``fuse_token=False`` drops the inattentive tokens: the suite then checks the reducer as one
    that is not merge-only (``merge_only`` describes the default, fusing, configuration)."""

    reducer = "topk"
    configs = ({"keep_rate": 0.7, "fuse_token": False}, {"keep_rate": 0.6, "layers": [1, 3], "fuse_token": False})
    merge_only = False
