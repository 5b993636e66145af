from tmcore.testing import ReducerConformance


class TestPiToMeConformance(ReducerConformance):
    reducer = "pitome"
    configs = (
        {"ratio": 0.9},
        {"ratio": 0.8, "variant": ["pitome", "pitome_bsm", "pitome_text", "pitome"], "margin": (0.5, -0.2)},
        {"ratio": 0.5, "variant": "pitome", "margin": [0.9, 0.5, 0.2, 0.0], "prop_attn": True},
        {"ratio": [0.7, 1.0, 0.55, 0.95], "variant": "pitome_bsm", "margin": 0.3, "alpha": 0.5, "size_weighted": False},
    )
