"""Config validation, defaults and the blocks each scheme reads."""

from __future__ import annotations

import pytest

import tmcore
from tm_atc.reducer import DEFAULT_KEEP_RATE, default_layers
from tmcore.testing.padding import make_reducer


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"keep_rate": 0}, ["keep_rate=0", "(0, 1]"]),
        ({"keep_rate": 1.5}, ["keep_rate=1.5", "(0, 1]"]),
        ({"keep_rate": True}, ["keep_rate=True"]),
        ({"keep_rate": "0.5"}, ["keep_rate='0.5'"]),
        ({"linkage": "ward"}, ["linkage='ward'", "'average', 'complete', 'single'"]),
        ({"layers": [3, 3]}, ["layers=[3, 3]", "more than once"]),
        ({"prop_attn": 1}, ["prop_attn=1", "True, False or None"]),
        ({"r": -1}, ["r=-1", "an int >= 0"]),
        ({"r": 8, "keep_rate": 0.5}, ["r=8", "keep_rate=0.5", "allowed: r alone"]),
        ({"r": 8, "layers": [1]}, ["layers=[1]", "allowed: r alone"]),
        ({"layers": [1, 12]}, ["layers=[1, 12]", "[12]", "0 to 11"]),
        ({"keep_rate": 0.1}, ["keep_rate=0.1", "0 clusters", "0.17"]),
        ({"clusters": 3}, ["unknown config key 'clusters'"]),
    ],
)
def test_bad_config_is_refused_in_words(config, words):
    with pytest.raises(tmcore.InvalidConfigError) as err:
        make_reducer("atc", 1, num_layers=12, num_tokens=197, **config)
    for word in words:
        assert word in str(err.value)


def test_defaults_follow_the_official_fine_tuned_scheme():
    red = make_reducer("atc", 1, num_layers=12, num_tokens=197)
    assert red.keep_rate == DEFAULT_KEEP_RATE and red.linkage == "average"
    assert sorted(red.index) == [3, 6, 9] and not red.prop_attn and red.equal_weights
    assert [layer for layer in range(12) if red.needs(layer)] == [3, 6, 9]
    on = make_reducer("atc", 1, num_layers=12, num_tokens=197, prop_attn=True)
    assert on.prop_attn and not on.equal_weights


def test_r_scheme_defaults_to_proportional_attention_and_size_weights():
    red = make_reducer("atc", 1, num_layers=12, num_tokens=197, r=(8, 1))
    assert red.prop_attn and not red.equal_weights
    assert red.needs(0) == frozenset() and red.needs(11) == frozenset({"keys"})  # r ramps 0 -> 16
    off = make_reducer("atc", 1, num_layers=12, num_tokens=197, r=8, prop_attn=False)
    assert not off.prop_attn and not off.equal_weights  # the official patch merges by size anyway


def test_r_is_capped_with_a_warning():
    with pytest.warns(tmcore.ScheduleClampWarning, match="block 2"):
        make_reducer("atc", 1, num_layers=3, num_tokens=33, r=[10, 10, 15])


@pytest.mark.parametrize(("depth", "layers"), [(12, [3, 6, 9]), (4, [1, 2, 3]), (24, [6, 12, 18]), (2, [0, 1])])
def test_default_layers(depth, layers):
    assert default_layers(depth) == layers


def test_listed_blocks_count_in_depth_order():
    red = make_reducer("atc", 1, num_layers=12, num_tokens=197, keep_rate=0.5, layers=[9, 3, 6])
    assert red.index == {3: 0, 6: 1, 9: 2}


def test_config_round_trips_through_json():
    for config in ({"r": (8, -1), "linkage": "single"}, {"keep_rate": 0.7, "layers": [2, 5]}):
        red = make_reducer("atc", 1, num_layers=12, num_tokens=197, **config)
        again = type(red.config).model_validate_json(red.config.model_dump_json())
        assert again == red.config
