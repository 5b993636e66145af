"""The adapter base class and the undo log that makes `tmcore.remove` exact."""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any, ClassVar

from torch import nn

from tmcore.errors import IncompatibleVersionError
from tmcore.reducer import INPUTS, ModelInfo, TokenReducer
from tmcore.runtime import Runtime

__all__ = ["Adapter", "Patch", "version_tuple"]


def version_tuple(version: str) -> tuple[int, ...]:
    """``"1.0.31"`` -> ``(1, 0, 31)``; pre-release and local suffixes are ignored."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0].split("dev")[0])[:3])


class Patch:
    """Everything one ``tmcore.apply`` changed on a model, and how to take it back.

    Adapters change models only through `set_attr` and `add_hook`, so `undo` restores the model
    exactly: instance attributes that shadowed nothing are deleted, shadowed ones put back. The
    log is plain data (no closures), so ``copy.deepcopy`` of a patched model yields an
    independently removable copy.
    """

    def __init__(self, reducer: TokenReducer, adapter: Adapter, runtime: Runtime) -> None:
        self.reducer = reducer
        self.adapter = adapter
        self.runtime = runtime
        self._log: list[tuple[Any, ...]] = []

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute (e.g. a bound ``forward``), remembering what was there."""
        had = name in obj.__dict__
        self._log.append(("attr", obj, name, had, obj.__dict__.get(name)))
        object.__setattr__(obj, name, value)

    def add_hook(self, handle: Any) -> None:
        """Keep a ``torch.utils.hooks.RemovableHandle`` for removal."""
        self._log.append(("hook", handle))

    def undo(self) -> None:
        while self._log:
            entry = self._log.pop()
            if entry[0] == "hook":
                entry[1].remove()
                continue
            _, obj, name, had, old = entry
            if had:
                object.__setattr__(obj, name, old)
            else:
                object.__delattr__(obj, name)


class Adapter:
    """Knows one backbone family: how to find its blocks, protect its prefix tokens, feed the
    attention bias through a public argument, capture what reducers need, and pool.

    Subclasses set the class attributes and implement `handles`, `describe` and `patch`.

    Attributes:
        name: registry name, e.g. ``"timm"``.
        description: the families it supports, for error messages and ``tmcore plugins``.
        library: the backbone library's distribution name, checked against `supported_versions`.
        supported_versions: ``(minimum inclusive, maximum exclusive)``, e.g. ``("1.0", "1.1")``.
        inputs: which `INPUTS` it can compute for reducers.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    library: ClassVar[str | None] = None
    supported_versions: ClassVar[tuple[str, str] | None] = None
    inputs: ClassVar[frozenset[str]] = INPUTS

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """Whether this adapter knows ``model``'s family (cheap; must not import heavy libraries)."""
        raise NotImplementedError

    def check_environment(self) -> None:
        """Refuse to patch when the installed backbone library is outside `supported_versions`."""
        if self.library is None or self.supported_versions is None:
            return
        try:
            installed = metadata.version(self.library)
        except metadata.PackageNotFoundError:
            return
        lo, hi = self.supported_versions
        if not version_tuple(lo) <= version_tuple(installed) < version_tuple(hi):
            raise IncompatibleVersionError(
                f"adapter {self.name!r} supports {self.library}>={lo},<{hi}, but {self.library}=={installed} "
                f"is installed; install a supported {self.library} or an adapter release for {installed}"
            )

    def describe(self, model: nn.Module) -> ModelInfo:
        raise NotImplementedError

    def patch(self, model: nn.Module, patch: Patch) -> None:
        """Patch ``model`` in place through ``patch.set_attr`` / ``patch.add_hook`` only."""
        raise NotImplementedError
