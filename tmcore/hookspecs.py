"""The hooks a tmcore plugin implements (entry-point group ``tmcore``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("tmcore")
hookimpl = pluggy.HookimplMarker("tmcore")


@hookspec
def tmcore_register_reducers(register: Callable[[type[Any]], None]) -> None:
    """Register reducer classes: call ``register(ReducerClass)`` once for each.

    A reducer class satisfies `tmcore.TokenReducer` (usually by subclassing `tmcore.BaseReducer`).
    """


@hookspec
def tmcore_register_adapters(register: Callable[[type[Any]], None]) -> None:
    """Register adapter classes: call ``register(AdapterClass)`` once for each (`tmcore.Adapter`)."""
