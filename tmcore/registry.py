"""Plugin discovery: pluggy over the ``tmcore`` entry-point group.

Each installed distribution that declares ``[project.entry-points.tmcore]`` is imported and its
hook implementations are called with a ``register`` callback, one distribution at a time, so
every registered name is tied to the distribution that registered it. A plugin that fails to
import (or whose hook raises) is skipped with a `PluginLoadWarning`; a duplicate name or an
invalid registration is a `PluginError` naming both distributions.

Environment: ``TMCORE_PLUGINS=a,b`` loads only those distributions; ``TMCORE_DISABLE_PLUGINS=c``
skips those. A name in either that matches no installed plugin distribution is a
`PluginLoadWarning`; distributions skipped this way are in `Registry.skipped` (with the
variable that skipped them), so an unknown reducer says "disabled" rather than "pip install".
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy
from packaging.utils import canonicalize_name

from tmcore import hookspecs
from tmcore.adapter import Adapter
from tmcore.errors import NoAdapterError, PluginError, PluginLoadWarning, UnknownReducerError
from tmcore.reducer import check_reducer

__all__ = ["ENTRY_POINT_GROUP", "KNOWN_REDUCERS", "Registry", "PluginInfo", "Registration", "registry"]

ENTRY_POINT_GROUP = "tmcore"

KNOWN_REDUCERS = {
    "tome": "tm-tome",
    "pitome": "tm-pitome",
    "ltmp": "tm-ltmp",
    "tomecis": "tm-tomecis",
    "ppt": "tm-ppt",
    "random": "tm-random",
    "topk": "tm-topk",
    "tofu": "tm-tofu",
    "mctf": "tm-mctf",
    "diffrate": "tm-diffrate",
    "atc": "tm-atc",
    "tomesd": "tm-tomesd",
}
"""The project's own reducers and the distribution to ``pip install`` for each."""

KNOWN_ADAPTERS = {"timm": "tm-timm", "transformers": "tm-transformers", "diffusers": "tm-diffusers"}
"""The backbone library a model class comes from (its top-level module) -> the project's adapter
distribution for it (installed with tmcore; ``tmcore[timm]`` / ``tmcore[transformers]`` add the
library itself)."""


def uncompiled(model: Any) -> Any:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), or ``model`` itself:
    tmcore's calls (trace, save, remove, the test kit) take the compiled model as well."""
    inner = getattr(model, "_orig_mod", None)
    return inner if inner is not None and type(model).__name__ == "OptimizedModule" else model


def _normalize(name: str) -> str:
    return canonicalize_name(name)


def _env_names(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {_normalize(n) for n in raw.split(",") if n.strip()}


@dataclass(frozen=True)
class Registration:
    """One registered reducer or adapter class and where it came from."""

    name: str
    obj: type[Any]
    distribution: str
    version: str


@dataclass
class PluginInfo:
    """One installed tmcore plugin distribution."""

    distribution: str
    version: str
    reducers: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    error: str | None = None


class Registry:
    """Loads plugins on first use; `reload` starts over (tests, after installing a plugin)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._loaded = False
        self.reducers: dict[str, Registration] = {}
        self.adapters: dict[str, Registration] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self.skipped: dict[str, str] = {}
        """Installed plugin distributions not loaded, with why (``TMCORE_PLUGINS=...``)."""
        self.manager = pluggy.PluginManager(ENTRY_POINT_GROUP)

    # -- loading -----------------------------------------------------------------------------
    def reload(self) -> None:
        with self._lock:
            self._loaded = False
            self.reducers, self.adapters, self.plugins, self.skipped = {}, {}, {}, {}
            self.manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
            self.ensure_loaded()

    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self.manager.add_hookspecs(hookspecs)
            only, disabled = _env_names("TMCORE_PLUGINS"), _env_names("TMCORE_DISABLE_PLUGINS") or set()
            seen: set[tuple[str, str]] = set()
            eps = sorted(
                metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.dist.name if e.dist else "", e.name)
            )
            for ep in eps:
                dist = _normalize(ep.dist.name) if ep.dist else "(unknown)"
                version = ep.dist.version if ep.dist else "?"
                if (dist, ep.name) in seen:  # the same distribution found twice on sys.path
                    continue
                seen.add((dist, ep.name))
                if only is not None and dist not in only:
                    self.skipped[dist] = f"not in TMCORE_PLUGINS={os.environ['TMCORE_PLUGINS']}"
                elif dist in disabled:
                    self.skipped[dist] = f"disabled by TMCORE_DISABLE_PLUGINS={os.environ['TMCORE_DISABLE_PLUGINS']}"
                else:
                    self._load_one(ep, dist, version)
            found = {d for d, _ in seen}
            for var, names in (("TMCORE_PLUGINS", only or set()), ("TMCORE_DISABLE_PLUGINS", disabled)):
                if names - found:
                    warnings.warn(
                        f"{var} names {', '.join(sorted(names - found))}, which matches no installed tmcore "
                        f"plugin distribution; installed: {', '.join(sorted(found)) or 'none'}",
                        PluginLoadWarning,
                        stacklevel=3,
                    )
            self._loaded = True

    def _load_one(self, ep: metadata.EntryPoint, dist: str, version: str) -> None:
        info = self.plugins.setdefault(dist, PluginInfo(distribution=dist, version=version))
        pending: list[tuple[str, type[Any]]] = []
        plugin = None
        try:
            plugin = ep.load()
            self.manager.register(plugin, name=f"{dist}:{ep.name}")
            for hook_name, kind in (("tmcore_register_reducers", "reducer"), ("tmcore_register_adapters", "adapter")):
                for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(register=lambda obj, _kind=kind: pending.append((_kind, obj)))
        except Exception as exc:  # a broken plugin must not take the others down
            if plugin is not None and self.manager.is_registered(plugin):
                self.manager.unregister(plugin)
            info.error = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"tmcore plugin {dist} {version} (entry point {ep.name} = {ep.value}) failed to load "
                f"and was skipped: {info.error}",
                PluginLoadWarning,
                stacklevel=4,
            )
            return
        for kind, obj in pending:
            self._add(kind, obj, dist, version, info)

    def _add(self, kind: str, obj: type[Any], dist: str, version: str, info: PluginInfo) -> None:
        table = self.reducers if kind == "reducer" else self.adapters
        _check_registration(kind, obj, dist)
        name = obj.name
        if name in table:
            other = table[name]
            raise PluginError(
                f"{kind} name {name!r} is registered twice: by {other.distribution} {other.version} "
                f"({other.obj.__module__}.{other.obj.__qualname__}) and by {dist} {version} "
                f"({obj.__module__}.{obj.__qualname__}); uninstall one of them or disable it with "
                f"TMCORE_DISABLE_PLUGINS={dist}"
            )
        table[name] = Registration(name=name, obj=obj, distribution=dist, version=version)
        (info.reducers if kind == "reducer" else info.adapters).append(name)

    # -- lookup ------------------------------------------------------------------------------
    def get_reducer(self, name: str) -> Registration:
        self.ensure_loaded()
        installed = ", ".join(f"{r.name} ({r.distribution})" for r in self.reducers.values()) or "none"
        if not isinstance(name, str):
            raise UnknownReducerError(
                f"reducer={name!r} ({type(name).__name__}); allowed: a registered reducer name, a string: {installed}"
            )
        if name in self.reducers:
            return self.reducers[name]
        msg = f"unknown reducer {name!r}. Installed reducers: {installed}."
        if KNOWN_REDUCERS.get(name) in self.skipped:
            dist = KNOWN_REDUCERS[name]
            msg += f" {name!r} is provided by {dist}, which is installed but not loaded: {self.skipped[dist]}"
        elif name in KNOWN_REDUCERS:
            msg += (
                f" {name!r} is provided by the distribution {KNOWN_REDUCERS[name]}: pip install {KNOWN_REDUCERS[name]}"
            )
        else:
            close = difflib.get_close_matches(name, [*self.reducers, *KNOWN_REDUCERS], n=1)
            if close:
                msg += f" Did you mean {close[0]!r}?"
            missing = {k: v for k, v in KNOWN_REDUCERS.items() if k not in self.reducers}
            if missing:
                msg += " Others: " + ", ".join(f"{k} (pip install {v})" for k, v in missing.items())
            if self.skipped:
                msg += " Installed but not loaded: " + "; ".join(f"{d} ({why})" for d, why in self.skipped.items())
        raise UnknownReducerError(msg)

    def adapter_for(self, model: Any) -> Any:
        """An instance of the adapter that handles ``model`` (`find_adapter`'s class)."""
        return self.find_adapter(model).obj()

    def find_adapter(self, model: Any) -> Registration:
        self.ensure_loaded()
        model = uncompiled(model)
        for reg in self.adapters.values():
            if reg.obj.handles(model):
                return reg
        cls = type(model)
        supported = "; ".join(f"{a.name} ({a.distribution}): {a.obj.description}" for a in self.adapters.values())
        raise NoAdapterError(
            f"no installed adapter handles a model of class {cls.__module__}.{cls.__qualname__}. "
            f"Supported families: {supported or 'none (no adapter installed)'}. {self._adapter_hint(cls)}"
        )

    def _adapter_hint(self, cls: type) -> str:
        """What to do about a model class no adapter handles, from the library it comes from."""
        library = cls.__module__.split(".")[0]
        dist = KNOWN_ADAPTERS.get(library)
        if dist is None:
            return (
                f"{library} models need an adapter of their own: tmcore new-plugin NAME --adapter writes one "
                "(CONTRIBUTING.md, 'Writing an adapter')"
            )
        if dist in self.skipped:
            return f"{dist} is installed but not loaded: {self.skipped[dist]}"
        if any(a.distribution == dist for a in self.adapters.values()):
            return f"{cls.__qualname__} is not among the {library} families {dist} supports"
        return f"for {library} models: pip install {dist}"


ADAPTER_METHODS = ("handles", "describe", "blocks", "patch_block", "flops")
"""What an adapter must implement itself (`tmcore.Adapter`'s versions raise)."""


def _check_registration(kind: str, obj: Any, dist: str) -> None:
    def bad(why: str) -> PluginError:
        return PluginError(f"{dist} registered an invalid {kind} {obj!r}: {why}")

    if not inspect.isclass(obj):
        raise bad("register() takes the class itself")
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise bad(f"`name` must be a lowercase identifier, got {name!r}")
    if kind == "reducer":
        problems = check_reducer(obj)
        if problems:
            raise bad(
                "it does not satisfy tmcore.TokenReducer (subclass tmcore.BaseReducer for the defaults): "
                + "; ".join(problems)
            )
    else:
        if not issubclass(obj, Adapter):
            raise bad("adapters must subclass tmcore.Adapter")
        missing = [m for m in ADAPTER_METHODS if inspect.getattr_static(obj, m) is inspect.getattr_static(Adapter, m)]
        if missing:
            methods = ", ".join(f"{m}()" for m in missing)
            raise bad(f"it does not implement {methods} (tmcore.Adapter leaves them to its subclasses)")


registry = Registry()
"""The process-wide registry used by the public API."""
