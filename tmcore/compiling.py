"""Two things code inside a patched forward needs to stay in one graph under ``torch.compile``.

- `per_shape`: a cache of Python results per input shape (a schedule for a sequence length,
  index tensors for a token count). Eager, it is an ``lru_cache``; dynamo traces the plain function
  instead, silently, as its graph is already specialised on those shapes.
- `warn_in_forward`: a warning raised in the forward (a schedule capped for a new length). Eager, it
  warns at once; under dynamo it warns while tracing rather than breaking the graph.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch._dynamo.comptime import comptime

__all__ = ["per_shape", "warn_in_forward"]

F = TypeVar("F", bound=Callable[..., Any])


def per_shape(maxsize: int) -> Callable[[F], F]:
    """``functools.lru_cache(maxsize)`` for functions of shapes (ints, strings, devices) called in
    a forward; under ``torch.compile`` the wrapped function is traced directly (dynamo ignores an
    ``lru_cache`` anyway, with a warning per call site). ``cache_clear`` / ``cache_info`` as usual."""

    def decorate(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            if torch.compiler.is_compiling():
                return fn(*args)
            return cached(*args)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        call.cache_info = cached.cache_info  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return decorate


def warn_in_forward(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` for code inside a forward, also when ``torch.compile``
    traces it with ``fullgraph=True``: dynamo cannot trace ``warnings.warn`` (a graph break), so
    while tracing it warns at trace time instead, once per compiled graph, as an eager forward
    with a `per_shape` cache warns once per shape. (Dynamo's reorderable logging functions would
    replay it after the graph, but drop calls from inlined functions.)"""
    if torch.compiler.is_compiling():
        comptime(_warn_at_trace)
    else:
        warnings.warn(message, category, stacklevel=2)


def _warn_at_trace(ctx: Any) -> None:
    message, category = (ctx.get_local(name).as_python_constant() for name in ("message", "category"))
    warnings.warn(message, category, stacklevel=1)  # the frame is dynamo's: no user line to point at
