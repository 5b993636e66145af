"""Per-layer reduction schedules: ToMe's ``r`` forms (docs/algorithms.md 1.8) and their validation."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from tmcore.compiling import per_shape, warn_in_forward
from tmcore.config import Integer, Number, Rule, check_pair, field_type, pair_json, per_block, rule_of
from tmcore.errors import ScheduleClampWarning
from tmcore.matching import max_bipartite_r, max_prune_r

__all__ = [
    "RSchedule",
    "BipartiteSchedule",
    "PruneSchedule",
    "parse_r",
    "clamped_r",
    "clamped_r_cached",
    "block_r",
    "token_counts",
]

RValue = int | list[int] | tuple[int, float]

_R = rule_of(Integer(ge=0))
_INFLECT = rule_of(Number(ge=-1, le=1))
_R_ALLOWED = (
    f"{_R.allowed} (the same r in every block), a list of such ints (one per block), "
    f"or a tuple (r, inflect) of {_R.allowed} and {_INFLECT.allowed} (a linear ramp)"
)


def _check_r(value: Any) -> RValue:
    if isinstance(value, list):
        return _R.each(value)  # empty: no block merges
    pair = check_pair(value, ("r", "inflect"), (_R, _INFLECT))
    return _R.check(value) if pair is None else pair


RSchedule = field_type(Rule(_R_ALLOWED, _check_r), RValue, json=pair_json(("r", "inflect")))
"""A pydantic field type for ToMe-style ``r``: int, per-block list, or ``(r, inflect)``."""


def parse_r(num_layers: int, r: RValue, reducer: str = "") -> list[int]:
    """Expand an ``r`` schedule to one value per block (ToMe's ``parse_r``).

    ``int`` -> constant; ``list`` -> padded with zeros to ``num_layers`` (longer is an error);
    ``(r, inflect)`` -> ``lo = int(r * (1 - inflect))``, ``hi = 2r - lo``, linear from ``lo`` to
    ``hi`` with each value truncated to int, exactly as the original computes it.
    """
    if isinstance(r, list):
        return per_block(reducer, "r", r, num_layers, pad=0)
    base, inflect = (r, 0.0) if isinstance(r, int) else r
    lo = int(base * (1.0 - inflect))
    hi = 2 * base - lo
    if num_layers == 1:  # the original divides by num_layers - 1
        return [lo]
    step = (hi - lo) / (num_layers - 1)
    return [int(lo + step * i) for i in range(num_layers)]


_LIMITS = {
    "bipartite": (max_bipartite_r, "the 50% per-block limit of bipartite matching"),
    "prune": (max_prune_r, "the per-block limit of pruning (every unprotected token but one)"),
}
"""How much one block may remove, by kind of reduction: ``(limit(num_tokens, num_protected), words)``."""


def _clamp(
    r_list: tuple[int, ...], num_tokens: int, num_protected: int, kind: str
) -> tuple[tuple[int, ...], list[tuple[int, int, int]]]:
    """``(capped r_list, [(block, requested r, limit), ...])``."""
    limit_of = _LIMITS[kind][0]
    out, capped, n = [], [], num_tokens
    for layer, r in enumerate(r_list):
        limit = limit_of(n, num_protected)
        if r > limit:
            capped.append((layer, r, limit))
            r = limit
        out.append(r)
        n -= r
    return tuple(out), capped


def clamped_r(
    r_list: list[int] | tuple[int, ...],
    num_tokens: int,
    num_protected: int,
    stacklevel: int = 2,
    kind: str = "bipartite",
) -> tuple[int, ...]:
    """Cap each block's ``r`` at what one block can remove (``kind``: half its unprotected tokens
    for bipartite matching, all but one for pruning), with a warning if any is capped
    (``stacklevel`` as in `warnings.warn`, counted from the caller of this function)."""
    out, capped = _clamp(tuple(r_list), num_tokens, num_protected, kind)
    if capped:
        warnings.warn(
            _capped_message(capped, num_tokens, num_protected, kind), ScheduleClampWarning, stacklevel=stacklevel + 1
        )
    return out


def _capped_message(capped: list[tuple[int, int, int]], num_tokens: int, num_protected: int, kind: str) -> str:
    return (
        f"r exceeds {_LIMITS[kind][1]} for {num_tokens} tokens "
        f"({num_protected} protected) and was capped: "
        + ", ".join(f"block {layer}: r={r} -> {limit}" for layer, r, limit in capped)
    )


def _traced_capped_message(capped: list[tuple[int, int, int]], num_protected: int, kind: str) -> str:
    # Formatting the traced length (or a limit derived from it) would make dynamo specialise
    # the graph on that length; the requested values are constants.
    return (
        f"r exceeds {_LIMITS[kind][1]} for the input lengths of a compiled graph "
        f"({num_protected} protected) and was capped in: "
        + ", ".join(f"block {layer} (r={r})" for layer, r, _ in capped)
        + "; the uncompiled model's warning names each length and limit"
    )


@per_shape(maxsize=256)
def clamped_r_cached(
    r_list: tuple[int, ...], num_tokens: int, num_protected: int, kind: str = "bipartite"
) -> tuple[int, ...]:
    """`clamped_r` for the forward pass: computed (and warned about) once per input shape, also
    inside a compiled graph (`tmcore.compiling`)."""
    out, capped = _clamp(r_list, num_tokens, num_protected, kind)
    if capped:
        message = (
            _traced_capped_message(capped, num_protected, kind)
            if torch.compiler.is_compiling()
            else _capped_message(capped, num_tokens, num_protected, kind)
        )
        warn_in_forward(message, ScheduleClampWarning)
    return out


@per_shape(maxsize=256)
def block_r(r: int, layer: int, num_tokens: int, num_protected: int = 0, kind: str = "bipartite") -> int:
    """Block scope (`tmcore.reducer.SCOPES`): block ``layer``'s ``r`` capped at what one block of
    ``num_tokens`` can remove, with a `ScheduleClampWarning` once per length. Every block starts
    from its own tokens there, so nothing accumulates from block to block."""
    limit = _LIMITS[kind][0](num_tokens, num_protected)
    if r > limit:
        message = (
            f"r exceeds {_LIMITS[kind][1]} in block {layer} (r={r}) and was capped"
            if torch.compiler.is_compiling()  # the traced length would specialise the graph
            else _capped_message([(layer, r, limit)], num_tokens, num_protected, kind)
        )
        warn_in_forward(message, ScheduleClampWarning)
    return min(r, limit)


def token_counts(r_list: list[int] | tuple[int, ...], num_tokens: int) -> list[int]:
    """Tokens entering each block, then the count leaving the last block."""
    counts = [num_tokens]
    for r in r_list:
        counts.append(counts[-1] - r)
    return counts


class BipartiteSchedule:
    """Per-block ``r`` for bipartite matching, each capped at half of its block's unprotected
    tokens: for the model's own input length once at apply time (warning there, at the user's
    ``tmcore.apply`` call), for any other length once per length (`clamped_r_cached`).
    `PruneSchedule` is the same for pruning.

    Args:
        r_list: the requested ``r`` of every block (e.g. from `parse_r`).
        num_tokens: tokens entering the first block at the model's default input size.
        num_protected: length of the protected prefix.
        stacklevel: as in `warnings.warn`, counted from the caller of this constructor; the
            default, 5, points at the user's ``tmcore.apply`` line when a reducer builds its
            schedule in ``setup`` (setup, ``BaseReducer.__init__``, ``_build``, ``apply``, caller).
    """

    kind = "bipartite"

    def __init__(self, r_list: list[int] | tuple[int, ...], num_tokens: int, num_protected: int, stacklevel: int = 5):
        self.r_list = tuple(r_list)
        self.num_tokens = num_tokens
        self.num_protected = num_protected
        self.default = clamped_r(self.r_list, num_tokens, num_protected, stacklevel=stacklevel + 1, kind=self.kind)

    def __call__(self, num_tokens: int) -> tuple[int, ...]:
        """Per-block ``r`` after the cap, for ``num_tokens`` entering the first block."""
        if num_tokens == self.num_tokens:
            return self.default
        return clamped_r_cached(self.r_list, num_tokens, self.num_protected, self.kind)

    def active(self, layer: int) -> bool:
        """Whether block ``layer`` may reduce at all (``r > 0`` requested there)."""
        return self.r_list[layer] > 0


class PruneSchedule(BipartiteSchedule):
    """`BipartiteSchedule` for pruning: each block's ``r`` capped at its unprotected tokens
    minus one (a block keeps at least one unprotected token)."""

    kind = "prune"
