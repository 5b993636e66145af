"""The strict config field types (`tmcore.config`), `validate_config`'s messages, and a sweep of
every installed reducer's config keys with arbitrary values, validated and applied."""

from __future__ import annotations

import json
import math
import re
import warnings
from typing import Any, Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field
from pydantic_core import PydanticUndefined

import tmcore
from tmcore import InvalidConfigError, ReducerConfig, ScheduleClampWarning, TmcoreError
from tmcore.config import Bool, Choice, Integer, Number, OptionalBool, PerBlock, rule_of, show
from tmcore.reducer import validate_config
from tmcore.registry import registry

HUGE = 10**400
PYDANTIC_WORDS = ("Input should", "function-plain", "constrained-", "list[", "Value error")


class _Broken:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def _reducer(**fields: Any) -> type:
    """A stand-in reducer class whose config has ``fields`` (name -> annotation, all optional)."""
    annotations = dict(fields)
    namespace = {"__annotations__": annotations, **{k: Field(default=None) for k in fields}}
    model = type("DemoConfig", (ReducerConfig,), namespace)
    return type("Demo", (), {"name": "demo", "config_model": model})


def _refusal(tp: Any, value: Any) -> str:
    """The part of `validate_config`'s message about field ``x`` set to ``value``."""
    with pytest.raises(InvalidConfigError) as err:
        validate_config(_reducer(x=tp), {"x": value})
    text = str(err.value)
    assert text.startswith("invalid config for reducer 'demo': ")
    head = text.removeprefix("invalid config for reducer 'demo': ").split(". Allowed keys:")[0]
    assert not any(w in head for w in PYDANTIC_WORDS), head
    return head


def _accepted(tp: Any, value: Any) -> Any:
    return validate_config(_reducer(x=tp), {"x": value}).x


# -- accept / refuse tables ---------------------------------------------------------------------

_TAU = Number(gt=0, le=10)
_ANY = Number(ge=-math.inf, le=math.inf)
_BLOCK = Integer(ge=0)
_MODE = Choice(Literal["merge", "prune"])
_THRESHOLDS = PerBlock(Number(ge=-1, le=2))

ACCEPT = [
    (Bool, True, True),
    (Bool, False, False),
    (OptionalBool, None, None),
    (OptionalBool, False, False),
    (_TAU, 1, 1.0),
    (_TAU, 10, 10.0),
    (_TAU, 0.5, 0.5),
    (_ANY, math.inf, math.inf),
    (_ANY, -math.inf, -math.inf),
    (_ANY, 10**300, 1e300),
    (_ANY, -7, -7.0),
    (Number(), 1e308, 1e308),
    (_BLOCK, 0, 0),
    (_BLOCK, 2**63 - 1, 2**63 - 1),
    (_MODE, "merge", "merge"),
    (_THRESHOLDS, 0.5, 0.5),
    (_THRESHOLDS, 2, 2.0),
    (_THRESHOLDS, [1, -1, 0.25], [1.0, -1.0, 0.25]),
]


@pytest.mark.parametrize("tp, value, stored", ACCEPT)
def test_accepted_values_are_stored_as_their_type(tp, value, stored):
    out = _accepted(tp, value)
    assert out == stored and type(out) is type(stored)


# (type, the allowed sentence, values it refuses)
_REFUSALS = [
    (Bool, "True or False", (1, 0, 1.0, "yes", "true", None, math.nan, [], {}, [True])),
    (OptionalBool, "True, False or None (the model family's default)", (1, "yes", "false", math.nan, [], {})),
    (_TAU, "a finite number in (0, 10]", (True, False, "0.5", "yes", math.nan, math.inf, -math.inf)),
    (_TAU, "a finite number in (0, 10]", (HUGE, -HUGE, 0, 0.0, 11, None, [], [1], {})),
    (_ANY, "a number in [-inf, inf], not NaN", (math.nan, True, "inf", None, [math.inf], {})),
    (Number(), "a finite number", (math.inf, -math.inf)),
    (Number(gt=0), "a finite number > 0", (-1, 0)),
    (Number(le=1), "a finite number <= 1", (2, math.inf)),
    (_BLOCK, "an int >= 0", (-1, 2.0, True, "3", math.nan, None, [1], -HUGE)),
    (_MODE, "one of 'merge', 'prune'", ("Merge", "tome", ["merge"], None, 1, True, {})),
    (
        _THRESHOLDS,
        "a finite number in [-1, 2], the same for every block, or a non-empty list of them, one per block",
        (3, True, "0.5", math.nan, math.inf, None, [], [1, math.nan], [[0.5]], [True], (0.5,), {"x": 1}, HUGE),
    ),
]
REFUSE = [(tp, value, allowed) for tp, allowed, values in _REFUSALS for value in values]


@pytest.mark.parametrize("tp, value, allowed", REFUSE)
def test_refused_values_name_field_value_and_what_is_allowed(tp, value, allowed):
    head = _refusal(tp, value)
    assert head.startswith(f"x={show(value)}: must be {allowed}"), head


@pytest.mark.parametrize(
    "tp, value, why",
    [
        (_ANY, HUGE, "this int is too large for a float"),
        (_BLOCK, 2**63, "this int does not fit in 64 bits"),
        (_BLOCK, HUGE, "this int does not fit in 64 bits"),
        (_THRESHOLDS, [1, math.nan], "entry 1 (nan) is not"),
        (_THRESHOLDS, [0.5, [0.5]], "entry 1 ([0.5]) is not"),
        (_THRESHOLDS, [], "the list is empty"),
    ],
)
def test_refusals_say_why_where_the_sentence_alone_does_not(tp, value, why):
    assert _refusal(tp, value).endswith(f"; {why}")


def test_range_sentences():
    assert rule_of(Number(gt=0, le=10)).allowed == "a finite number in (0, 10]"
    assert rule_of(Number(ge=0.5, lt=1)).allowed == "a finite number in [0.5, 1)"
    assert rule_of(Number(ge=-math.inf)).allowed == "a number >= -inf, not NaN"
    assert rule_of(Number(gt=0, note="a temperature")).allowed == "a finite number > 0 (a temperature)"
    assert rule_of(Integer(ge=1, le=3)).allowed == "an int in [1, 3]"
    assert rule_of(Integer()).allowed == "an int"
    with pytest.raises(TypeError, match="at most one lower bound"):
        Number(gt=0, ge=0)
    with pytest.raises(TypeError, match="Literal of strings"):
        Choice(Literal[1, 2])


def test_a_rule_checks_values_outside_pydantic():
    rule = rule_of(_THRESHOLDS)
    assert rule.accepts([0.5, 1]) and not rule.accepts([0.5, math.nan])
    with pytest.raises(ValueError, match=r"^must be a finite number in \[-1, 2\].*; entry 1 \(nan\) is not$"):
        rule([0.5, math.nan])


# -- validate_config: any mapping, only InvalidConfigError ----------------------------------------


def test_show_never_raises_and_stays_short():
    assert show(_Broken()) == "<unprintable _Broken>"
    assert show(10**5000) == "<unprintable int>"  # beyond Python's int-to-str digit limit
    assert len(show(HUGE)) <= 80 and show(HUGE).endswith("...")
    assert show([1, "a"]) == "[1, 'a']"


@pytest.mark.parametrize(
    "config, message",
    [
        ({"x": _Broken()}, "x=<unprintable _Broken>: must be True or False"),
        ({"x": 10**5000}, "x=<unprintable int>: must be True or False"),
        ({1: True}, "config key 1 is not a string"),
        ({"y": _Broken()}, "unknown config key 'y' (value <unprintable _Broken>)"),
        ([("x", True)], "expected a mapping of config keys to values, got list"),
        (None, "expected a mapping of config keys to values, got NoneType None"),
    ],
)
def test_any_input_ends_in_invalid_config_error(config, message):
    with pytest.raises(InvalidConfigError) as err:
        validate_config(_reducer(x=Bool), config)
    assert message in str(err.value)


def test_plain_pydantic_fields_are_worded_without_internals():
    """A third-party reducer may use pydantic's own types: their errors are still one line per key
    in ``must be`` form, without union member names."""
    demo = _reducer(x=float | list[float])
    with pytest.raises(InvalidConfigError) as err:
        validate_config(demo, {"x": "abc"})
    head = str(err.value).split(". Allowed keys:")[0]
    assert "x='abc': must be a valid number" in head and "or must be a valid list" in head
    assert not any(w in head for w in ("float.", "list[", "Input should")), head


def test_json_round_trip_of_every_form():
    demo = _reducer(a=_ANY, b=_THRESHOLDS, c=_MODE, d=OptionalBool)
    cfg = validate_config(demo, {"a": -math.inf, "b": [0.5, 2], "c": "prune", "d": None})
    assert validate_config(demo, json.loads(cfg.model_dump_json())) == cfg


# -- the issue's examples ---------------------------------------------------------------------------


def _registered(name: str) -> type:
    registry.ensure_loaded()
    return registry.reducers[name].obj


@pytest.mark.parametrize(
    "name, config, message",
    [
        ("ltmp", {"tau": True}, "tau=True: must be a finite number in (0, 10]"),
        ("ltmp", {"tau": "0.5"}, "tau='0.5': must be a finite number in (0, 10]"),
        ("ltmp", {"tau": math.nan}, "tau=nan: must be a finite number in (0, 10]"),
        ("ltmp", {"merge_threshold": True}, "merge_threshold=True: must be a finite number in [-1, 2]"),
        ("ltmp", {"merge_threshold": 3}, "merge_threshold=3: must be a finite number in [-1, 2], the same for every"),
        ("ltmp", {"prune_threshold": [0, math.inf]}, "prune_threshold=[0, inf]: must be a finite number in [-1, 2]"),
        ("ltmp", {"reduction_target": True}, "reduction_target=True: must be a finite number in (0, 1]"),
        ("ltmp", {"mode": "merge_first"}, "mode='merge_first': must be one of 'merge_prune', 'prune_merge'"),
        ("tome", {"r": 4, "prop_attn": "yes"}, "prop_attn='yes': must be True, False or None"),
        ("tome", {"r": 4, "prop_attn": 1}, "prop_attn=1: must be True, False or None"),
        ("tome", {"r": HUGE}, "does not fit in 64 bits"),
        ("tomecis", {"r": 4, "prop_attn": 1}, "prop_attn=1: must be True or False"),
        ("pitome", {"ratio": 0.9, "size_weighted": "no"}, "size_weighted='no': must be True, False or None"),
        ("pitome", {"ratio": 0.9, "alpha": math.inf}, "alpha=inf: must be a finite number > 0"),
        ("ppt", {"threshold": HUGE}, "this int is too large for a float"),
        ("ppt", {"layers": [2**64]}, "entry 0 ("),
    ],
)
def test_issue_examples_are_refused_in_words(name, config, message):
    with pytest.raises(InvalidConfigError) as err:
        validate_config(_registered(name), config)
    text = str(err.value)
    assert message in text, text
    assert not any(w in text.split(". Allowed keys:")[0] for w in PYDANTIC_WORDS), text


def test_issue_examples_through_apply_leave_the_model_alone():
    model = _tiny_vit()
    with pytest.raises(InvalidConfigError, match=r"tau=True: must be a finite number in \(0, 10\]"):
        tmcore.apply(model, "ltmp", tau=True)
    assert tmcore.get_patch(model) is None


# -- sweep: every installed reducer, every key, any JSON-like value --------------------------------

registry.ensure_loaded()
REDUCERS = {name: reg.obj for name, reg in sorted(registry.reducers.items())}
KEYS = [(name, key) for name, cls in REDUCERS.items() for key in cls.config_model.model_fields]


def _unprintable_int() -> int:
    return 10**5000  # more digits than Python converts to text


# built, not sampled: hypothesis prints the strategy, and that int cannot be printed
_EDGE_INTS = st.sampled_from([HUGE, -HUGE, 2**63, 2**63 - 1, -(2**63) - 1]) | st.builds(_unprintable_int)
# small numbers hit the valid ranges (r, ratios, thresholds, tau) often enough to apply
_SMALL = st.integers(-2, 12) | st.floats(-1.5, 12)
_LEAVES = st.none() | st.booleans() | _SMALL | st.integers() | _EDGE_INTS | st.floats() | st.text(max_size=8)
JSON_LIKE = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3) | st.tuples(inner, inner)
    ),  # the Python form of pairs such as ToMe's (r, inflect)
    max_leaves=8,
)


def _base(cls: type) -> dict[str, Any]:
    """A config the tiny ViT accepts, to vary one key of."""
    return dict(cls.identity_config or cls.example_configs[0])


def _valid_values(cls: type, key: str) -> list[Any]:
    """Every value the reducer itself gives ``key`` (identity, examples, default)."""
    values = [c[key] for c in (cls.identity_config or {}, *cls.example_configs) if key in c]
    field = cls.config_model.model_fields[key]
    if field.default is not PydanticUndefined:
        values.append(field.default)
    elif field.default_factory is not None:
        values.append(field.default_factory())
    return values


def _values(cls: type, key: str) -> st.SearchStrategy[Any]:
    valid = _valid_values(cls, key)
    return st.one_of(*([st.sampled_from(valid)] if valid else []), _SMALL, JSON_LIKE)


def _names_key(message: str, key: str) -> bool:
    return re.search(rf"(^|[\s'(]){re.escape(key)}[=: ]", message.split(". Allowed keys:")[0]) is not None


@pytest.mark.parametrize("name, key", KEYS)
@settings(max_examples=60)
@given(data=st.data())
def test_any_value_validates_or_is_refused_naming_the_key(name, key, data):
    cls = REDUCERS[name]
    config = {**_base(cls), key: data.draw(_values(cls, key), label=key)}
    try:
        cfg = validate_config(cls, config)
    except InvalidConfigError as exc:
        assert _names_key(str(exc), key), str(exc)
        return
    assert validate_config(cls, json.loads(cfg.model_dump_json())) == cfg  # what tmcore.save writes, loads


def _tiny_vit() -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=7)


@pytest.fixture(scope="module")
def vit() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = _tiny_vit()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert "_tmcore_patch" not in model.__dict__
    assert all("forward" not in block.__dict__ for block in model.blocks)


@pytest.mark.parametrize("name, key", KEYS)
@settings(max_examples=40)
@given(data=st.data())
def test_apply_with_any_value_raises_only_tmcore_errors_and_leaves_the_model(vit, name, key, data):
    model, before = vit
    cls = REDUCERS[name]
    config = {**_base(cls), key: data.draw(_values(cls, key), label=key)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScheduleClampWarning)  # big r: capped, with a warning
        try:
            tmcore.apply(model, name, **config)
        except TmcoreError as exc:  # anything else fails the test
            _assert_unchanged(model, before)
            if isinstance(exc, InvalidConfigError):
                assert _names_key(str(exc), key), str(exc)
            return
    tmcore.remove(model)
    _assert_unchanged(model, before)
