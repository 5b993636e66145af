"""Strict field types for reducer configs (`tmcore.ReducerConfig` subclasses).

pydantic's lax mode turns ``True`` into ``1.0`` and ``"0.5"`` into ``0.5``; a reducer config
refuses both. Each type here is an ``Annotated`` type whose `pydantic.PlainValidator` is a
`Rule`: it accepts exactly the values its ``allowed`` sentence names and otherwise raises
``ValueError("must be <allowed>")``, which `tmcore.reducer.validate_config` shows after
``field=value:``.

Example::

    class MyConfig(ReducerConfig):
        ratio: PerBlock(Number(gt=0, le=1)) = Field(description="kept fraction, 0 < ratio <= 1")
        tau: Number(gt=0, le=10) = 0.5
        mode: Choice(Literal["merge", "prune"]) = "merge"
        prop_attn: OptionalBool = None

A field of its own shape (e.g. a number, a list or a ``(start, end)`` pair) is a `Rule` whose check
raises `Refused`, built from the rules of these types (`rule_of`) and `check_pair` / `pair_json`,
made a field type with `field_type`. `rule_of` also checks values outside pydantic (learned state
read from a file) against the same rule and sentence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, get_args

from pydantic import PlainSerializer, PlainValidator

from tmcore.errors import InvalidConfigError

__all__ = [
    "Bool",
    "OptionalBool",
    "Number",
    "Integer",
    "Choice",
    "PerBlock",
    "per_block",
    "blocks_in_range",
    "Blocks",
    "Rule",
    "Refused",
    "field_type",
    "rule_of",
    "check_pair",
    "pair_json",
    "show",
]

_INT64 = (-(2**63), 2**63 - 1)  # torch's index type: ints beyond it name no block or token count


class Refused(ValueError):
    """Raised by a `Rule`'s check for a value it does not accept; the message, if any, says why
    when the rule's sentence alone does not (e.g. which list entry failed)."""


@dataclass(frozen=True)
class Rule:
    """What one config value may be: ``allowed``, a phrase in words (``"a finite number in
    (0, 10]"``), and ``check``, which returns the value to store or raises `Refused`.

    Calling the rule runs the check and turns a refusal into ``ValueError("must be <allowed>")``
    (``"; <why>"`` appended when the refusal says why), the form pydantic reports.
    """

    allowed: str
    check: Callable[[Any], Any]

    def __call__(self, value: Any) -> Any:
        try:
            return self.check(value)
        except Refused as exc:
            why = f"; {exc}" if str(exc) else ""
            raise ValueError(f"must be {self.allowed}{why}") from None

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` passes the check."""
        try:
            self.check(value)
        except Refused:
            return False
        return True

    def each(self, values: list[Any] | tuple[Any, ...]) -> list[Any]:
        """``check`` of every entry; a refusal names the first bad entry (index and value)."""
        out = []
        for index, value in enumerate(values):
            try:
                out.append(self.check(value))
            except Refused as exc:
                why = f": {exc}" if str(exc) else ""
                raise Refused(f"entry {index} ({show(value)}) is not{why}") from None
        return out


def field_type(rule: Rule, tp: Any, json: Callable[[Any], Any] | None = None) -> Any:
    """``Annotated[tp, ...]`` validated by ``rule``; ``json`` gives the JSON form where Python's
    differs (a tuple written as a dict), and the rule must accept that form back."""
    if json is None:
        return Annotated[tp, PlainValidator(rule)]
    return Annotated[tp, PlainValidator(rule), PlainSerializer(json, when_used="json")]


def rule_of(tp: Any) -> Rule:
    """The `Rule` that validates a field type made here."""
    for meta in getattr(tp, "__metadata__", ()):
        if isinstance(meta, PlainValidator) and isinstance(meta.func, Rule):
            return meta.func
    raise TypeError(f"{tp!r} is not a tmcore.config field type")


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a message: cut to about ``limit`` characters, and never raising (an int
    with too many digits to print, a broken ``__repr__``)."""
    try:
        text = repr(value)
    except Exception:  # any failure to print must not hide the error being reported
        return f"<unprintable {type(value).__name__}>"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _with_note(allowed: str, note: str) -> str:
    return f"{allowed} ({note})" if note else allowed


# booleans --------------------------------------------------------------------------------------


def _check_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise Refused


def _check_optional_bool(value: Any) -> bool | None:
    return None if value is None else _check_bool(value)


Bool = field_type(Rule("True or False", _check_bool), bool)
"""``True`` or ``False`` only: not ``1``, ``"yes"`` or ``"true"``."""

OptionalBool = field_type(Rule("True, False or None (the model family's default)", _check_optional_bool), bool | None)
"""`Bool`, or ``None`` for "the model family's default" (resolved by the reducer's ``setup``)."""


# numbers ---------------------------------------------------------------------------------------


def _num(x: float) -> str:
    """``0``, ``0.5``, ``inf``: a bound as a reader writes it."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _bounds(gt: float | None, ge: float | None, lt: float | None, le: float | None) -> tuple[float, bool, float, bool]:
    """``(low, low closed, high, high closed)``; a missing end is open at infinity."""
    if gt is not None and ge is not None or lt is not None and le is not None:
        raise TypeError("give at most one lower bound (gt or ge) and one upper bound (lt or le)")
    low, low_closed = (ge, True) if ge is not None else (-math.inf if gt is None else gt, False)
    high, high_closed = (le, True) if le is not None else (math.inf if lt is None else lt, False)
    return low, low_closed, high, high_closed


def _in_range(value: float, low: float, low_closed: bool, high: float, high_closed: bool) -> bool:
    # exact for ints of any size (Python compares int and float without converting); NaN fails
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    return above and below


def _range_words(low: float, low_closed: bool, high: float, high_closed: bool) -> str:
    """`` in (0, 10]``, `` >= 0``, `` < 1`` or ``""``: an open end at infinity is no bound."""
    has_low = low_closed or low != -math.inf
    has_high = high_closed or high != math.inf
    if has_low and has_high:
        return f" in {'[' if low_closed else '('}{_num(low)}, {_num(high)}{']' if high_closed else ')'}"
    if has_low:
        return f" {'>=' if low_closed else '>'} {_num(low)}"
    if has_high:
        return f" {'<=' if high_closed else '<'} {_num(high)}"
    return ""


def Number(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    note: str = "",
) -> Any:
    """A real number (int or float, stored as float; not bool, not str) in a range.

    Unbounded ends are open at infinity, so ``inf`` and ``-inf`` pass only where a closed bound
    allows them (``Number(ge=-math.inf, le=math.inf)``: any number but NaN); NaN never passes.
    An int too large for a float is refused, not rounded to infinity. ``note`` explains the
    value in the message.
    """
    low, low_closed, high, high_closed = _bounds(gt, ge, lt, le)
    finite = not (low_closed and low == -math.inf or high_closed and high == math.inf)
    words = _range_words(low, low_closed, high, high_closed)
    allowed = f"a finite number{words}" if finite else f"a number{words}, not NaN"

    def check(value: Any) -> float:
        if not _is_real(value) or not _in_range(value, low, low_closed, high, high_closed):
            raise Refused
        try:
            return float(value)
        except OverflowError:
            raise Refused("this int is too large for a float") from None

    return field_type(Rule(_with_note(allowed, note), check), float)


def Integer(*, ge: int | None = None, le: int | None = None, note: str = "") -> Any:
    """An int (not bool, not a float with an integral value) with ``ge <= value <= le``, and
    always within 64 bits (torch's index type; beyond it is no count or index)."""
    bounds = _bounds(None, ge, None, le)
    words = _range_words(*bounds)

    def check(value: Any) -> int:
        if not _is_int(value) or not _in_range(value, *bounds):
            raise Refused
        if not _INT64[0] <= value <= _INT64[1]:
            raise Refused("this int does not fit in 64 bits")
        return value

    return field_type(Rule(_with_note(f"an int{words}", note), check), int)


def Choice(names: Any, note: str = "") -> Any:
    """One of the strings of a ``Literal`` type, e.g. ``Choice(Literal["merge", "prune"])``."""
    options = get_args(names)
    if not options or not all(isinstance(n, str) for n in options):
        raise TypeError(f"Choice takes a Literal of strings, got {names!r}")
    allowed = "one of " + ", ".join(repr(n) for n in options)

    def check(value: Any) -> str:
        if isinstance(value, str) and value in options:
            return value
        raise Refused

    return field_type(Rule(_with_note(allowed, note), check), names)


def PerBlock(item: Any, per: str = "block") -> Any:
    """One ``item`` value for every block, or a non-empty list of them, one per block (the
    reducer checks the list's length against the model in ``setup``). ``per`` names what the
    list runs over where that is not every block (PPT: ``"listed block"``)."""
    rule = rule_of(item)
    tp = get_args(item)[0]
    allowed = f"{rule.allowed}, the same for every {per}, or a non-empty list of them, one per {per}"

    def check(value: Any) -> Any:
        if not isinstance(value, list):
            return rule.check(value)
        if not value:
            raise Refused("the list is empty")
        return rule.each(value)

    return field_type(Rule(allowed, check), tp | list[tp])


_REQUIRED = object()


def blocks_in_range(reducer: str, field: str, blocks: list[int], num_layers: int, shown: Any = _REQUIRED) -> list[int]:
    """A `Blocks` value checked against the model's depth, in ``setup``: the one rule and message
    of every list of block indices.

    Args:
        reducer: the reducer's name; field: the config key; blocks: the indices.
        num_layers: the model's block count.
        shown: the value as the user gave it, for the message (default: ``blocks``).

    Raises:
        InvalidConfigError: naming the field, its value, the blocks out of range and the range.
    """
    bad = [block for block in blocks if block >= num_layers]
    if bad:
        shown = blocks if shown is _REQUIRED else shown
        raise InvalidConfigError(
            f"invalid config for reducer {reducer!r}: {field}={show(shown)}: block(s) {bad} out of range for a "
            f"model with {num_layers} blocks; allowed: 0 to {num_layers - 1}"
        )
    return blocks


def per_block(
    reducer: str, field: str, value: Any, length: int, per: str = "block", of: str = "", pad: Any = _REQUIRED
) -> list[Any]:
    """A `PerBlock` value as one entry per block: a single value for every block, or a list of
    exactly ``length`` entries (with ``pad``, at most ``length``, the rest filled with ``pad``).
    The one length rule and message of every per-block config value; call it in ``setup``, where
    the model's depth is known.

    Args:
        reducer: the reducer's name (the message names it; ``""``: the message starts with the field).
        field: the config key.
        value: the validated value (a list, or one value for every block).
        length: the number of blocks (or listed blocks) the list runs over.
        per: what one entry is for (``"block"``, ``"listed block"``).
        of: what ``length`` counts, for the message (default: ``"a model with {length} blocks"``).
        pad: fill value for a shorter list (``r`` schedules pad with 0); omitted: exact length.

    Raises:
        InvalidConfigError: naming the field, its value, the length found and the one allowed.
    """
    if not isinstance(value, list):
        return [value] * length
    padded = pad is not _REQUIRED
    if len(value) == length or (padded and len(value) < length):
        return list(value) + [pad] * (length - len(value))
    of = of or f"a model with {length} blocks"
    allowed = f"at most {length} entries (missing ones are {show(pad)})" if padded else f"exactly {length} entries"
    prefix = f"invalid config for reducer {reducer!r}: " if reducer else ""
    raise InvalidConfigError(
        f"{prefix}{field}={show(value)} has {len(value)} entries for {of}; "
        f"allowed: one value for every {per}, or a list of {allowed}, one per {per}"
    )


# pairs -----------------------------------------------------------------------------------------


def check_pair(value: Any, names: tuple[str, str], rules: tuple[Rule, Rule]) -> tuple[Any, Any] | None:
    """``value`` as a checked pair where it is a tuple, or a pair's JSON form (a dict with exactly
    the keys ``names``), each entry passing its rule; ``None`` where it is neither (another form
    of the field). Raises `Refused` for a tuple of another length or a bad entry."""
    if isinstance(value, dict) and set(value) == set(names):
        value = (value[names[0]], value[names[1]])
    if not isinstance(value, tuple):
        return None
    if len(value) != 2:
        raise Refused(f"this tuple has {len(value)} values")
    return (rules[0].check(value[0]), rules[1].check(value[1]))


def pair_json(names: tuple[str, str]) -> Callable[[Any], Any]:
    """The JSON form `check_pair` reads back: a pair as a dict keyed by ``names`` (JSON has no
    tuples), any other value as it is."""

    def to_json(value: Any) -> Any:
        return dict(zip(names, value)) if isinstance(value, tuple) else value

    return to_json


# block lists -------------------------------------------------------------------------------------


def Blocks(optional: bool = False) -> Any:
    """A list of distinct 0-based block indices, e.g. ``[3, 6, 9]`` (the blocks a reducer works
    in); with ``optional``, ``None`` too (the reducer's default blocks). The reducer checks the
    indices against the model's depth in ``setup``."""
    index = rule_of(Integer(ge=0))
    allowed = f"a list of distinct 0-based block indices, each {index.allowed}, e.g. [3, 6, 9]"

    def check(value: Any) -> list[int] | None:
        if value is None and optional:
            return None
        if not isinstance(value, (list, tuple)):
            raise Refused
        blocks = index.each(value)
        repeated = sorted({b for b in blocks if blocks.count(b) > 1})
        if repeated:
            raise Refused(f"block(s) {repeated} listed more than once")
        return blocks

    if optional:
        return field_type(Rule(f"None (the default blocks) or {allowed}", check), list[int] | None)
    return field_type(Rule(allowed, check), list[int])
