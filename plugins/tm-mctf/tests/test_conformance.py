import pytest

from tmcore.testing import ReducerConformance

pytestmark = pytest.mark.slow  # every tiny model x three configs: minutes


class TestMCTFConformance(ReducerConformance):
    reducer = "mctf"
    # every mode, both matchings and every pooling, over three configs (each config costs a full
    # pass over every tiny model: tests/test_reference.py covers the combinations one by one)
    configs = (
        {"r": 8},  # one-step-ahead attention (default mode), attention x size pooling
        {"r": 0.3, "layers": [0, 2], "one_step_ahead": 2, "bidirection": False, "pooling": "mean"},
        {"r": 6, "layers": [1, 2, 3], "one_step_ahead": 0, "pooling": "max", "tau_info": 0, "prop_attn": False},
    )
