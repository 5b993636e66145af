"""The public entry points: apply, remove, trace, save, load and the registry listings."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from torch import nn

from tmcore.adapter import Patch
from tmcore.errors import (
    AlreadyAppliedError,
    InvalidConfigError,
    InvalidFileError,
    NoAdapterError,
    NotAppliedError,
    TmcoreError,
    UnsupportedModelError,
)
from tmcore.reducer import validate_config
from tmcore.registry import PluginInfo, Registration, registry, uncompiled
from tmcore.runtime import Runtime
from tmcore.tracing import Trace

__all__ = ["apply", "remove", "trace", "save", "load", "reducers", "adapters", "plugins", "get_patch", "get_reducer"]

R = TypeVar("R")

_ATTR = "_tmcore_patch"
_FORMAT = "tmcore.reducer/1"


def get_patch(model: nn.Module) -> Patch | None:
    """The `Patch` ``tmcore.apply`` put on ``model`` (or on the model ``torch.compile`` wrapped),
    or ``None``."""
    return getattr(uncompiled(model), "__dict__", {}).get(_ATTR)


def get_reducer(model: nn.Module, kind: type[R]) -> R:
    """The reducer of class ``kind`` that ``tmcore.apply`` installed on ``model`` (a plugin's
    training helpers reach their learned state through it).

    Raises:
        NotAppliedError: ``model`` carries no reducer, or one of another kind.
    """
    patch = get_patch(model)
    if patch is None or not isinstance(patch.reducer, kind):
        found = "no reducer" if patch is None else f"reducer {patch.reducer.name!r}"
        name = getattr(kind, "name", kind.__name__)
        raise NotAppliedError(f"this model carries {found}; call tmcore.apply(model, {name!r}, ...) first")
    return patch.reducer


def _require_patch(model: nn.Module, what: str) -> Patch:
    patch = get_patch(model)
    if patch is None:
        raise NotAppliedError(f"{what} needs a model patched by tmcore.apply; {type(model).__name__} is not patched")
    return patch


def apply(
    model: nn.Module, reducer: str, *, replace: bool = False, full_length: bool = False, **config: Any
) -> nn.Module:
    """Patch ``model`` in place with the reducer registered as ``reducer``; returns ``model``.

    Args:
        model: a model some installed adapter handles (e.g. a timm ``VisionTransformer``).
        reducer: a registered reducer name (``tmcore.reducers()`` lists them), e.g. ``"tome"``.
        replace: replace a reducer applied earlier instead of raising `AlreadyAppliedError`.
        full_length: the last block brings the tokens back to the input length through the
            source map (each position gets its group's value; pruned positions zeros), for
            token-level heads (tagging, question answering, masked LM) and dense features.
        **config: the reducer's configuration, validated by its pydantic config model.

    Raises:
        UnknownReducerError, InvalidConfigError, NoAdapterError, UnsupportedModelError,
        IncompatibleVersionError, AlreadyAppliedError.
    """
    patch = _build(model, reducer, config, replace, full_length)
    _install(model, patch)
    return model


def _build(model: nn.Module, reducer: str, config: dict[str, Any], replace: bool, full_length: bool = False) -> Patch:
    """Validate everything and build the reducer and its Patch; the model is not touched yet."""
    reducer_cls = registry.get_reducer(reducer).obj
    cfg = validate_config(reducer_cls, config)
    if not isinstance(model, nn.Module):
        raise NoAdapterError(f"tmcore.apply takes a torch.nn.Module, got {type(model).__qualname__}")
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise NoAdapterError("apply tmcore before torch.compile: tmcore.apply(model, ...); torch.compile(model)")
    existing = get_patch(model)
    if existing is not None and not replace:
        raise AlreadyAppliedError(
            f"this model already carries reducer {existing.reducer.name!r} "
            f"({existing.reducer.config!r}); call tmcore.remove(model) first or pass replace=True"
        )
    adapter = registry.adapter_for(model)
    adapter.check_environment()
    info = adapter.describe(model)
    scopes = getattr(reducer_cls, "scopes", frozenset({"model"}))
    if info.scope not in scopes:
        others = sorted(n for n, r in registry.reducers.items() if info.scope in getattr(r.obj, "scopes", ()))
        raise UnsupportedModelError(
            f"reducer {reducer!r} works in scope {sorted(scopes)}, but this {type(model).__name__} ({info.family}) "
            f"is reduced in scope {info.scope!r}: "
            + (
                "every block merges, computes and unmerges its own tokens (the model needs all of them between "
                "blocks); "
                if info.scope == "block"
                else "tokens stay reduced for the rest of the model; "
            )
            + f"reducers for it: {', '.join(others) or 'none installed'}"
        )
    missing = reducer_cls.requires - adapter.inputs
    if missing:
        raise NoAdapterError(
            f"reducer {reducer!r} needs {sorted(missing)} from each layer, "
            f"which adapter {adapter.name!r} cannot provide"
        )
    if reducer_cls.requires_class_token and not info.class_token:
        others = sorted(n for n, r in registry.reducers.items() if not r.obj.requires_class_token)
        raise UnsupportedModelError(
            f"reducer {reducer!r} weighs tokens by the class token's attention, but this "
            f"{type(model).__name__} ({info.family}, {info.num_protected} prefix tokens, pool {info.pool!r}) "
            f"has no class token; reducers that work without one: {', '.join(others) or 'none installed'}"
        )
    if not isinstance(full_length, bool):
        raise InvalidConfigError(f"full_length={full_length!r}: allowed: True or False")
    instance = reducer_cls(cfg, info)
    if instance.prop_attn and not info.size_bias:
        raise UnsupportedModelError(
            f"reducer {reducer!r} asks for proportional attention (prop_attn), but the attention of this "
            f"{type(model).__name__} ({info.family}) takes no additive mask to carry log(size); pass prop_attn=False"
        )
    position = instance.position
    if position not in adapter.positions:
        raise UnsupportedModelError(
            f"reducer {reducer!r} reduces at position {position!r} ({info.family}), which adapter "
            f"{adapter.name!r} does not offer; it offers {sorted(adapter.positions)}"
        )
    return Patch(instance, adapter, Runtime(instance, info, full_length))


def _install(model: nn.Module, patch: Patch) -> None:
    """Replace any reducer on ``model`` with ``patch``'s, all or nothing: if the adapter fails,
    the model is left exactly as it was, its previous reducer included."""
    previous = get_patch(model)
    if previous is not None:
        remove(model)
    try:
        patch.adapter.patch(model, patch)
        patch.set_attr(model, _ATTR, patch)
    except BaseException:
        patch.undo()
        if previous is not None:  # the same adapter patched it before: it does again
            previous.adapter.patch(model, previous)
            previous.set_attr(model, _ATTR, previous)
        raise


def remove(model: nn.Module) -> nn.Module:
    """Restore ``model`` to exactly what it was before `apply`; returns ``model``."""
    _require_patch(model, "tmcore.remove").undo()
    return model


@contextmanager
def trace(model: nn.Module) -> Iterator[Trace]:
    """Record what each forward inside the ``with`` block does (the last one is kept).

    Example::

        with tmcore.trace(model) as t:
            model(images)
        t.token_counts   # [197, 184, ..., 54, 41] for ToMe r=13 on a ViT-S/16
        t.sizes, t.source, t.source_matrix(), t.unmerge(tokens)
    """
    runtime = _require_patch(model, "tmcore.trace").runtime
    with runtime.tracing(Trace()) as record:
        yield record


def save(model: nn.Module, path: str | Path) -> None:
    """Write the model's reducer name, config and learned state (if any) as safetensors.

    Raises:
        NotAppliedError: the model carries no reducer.
        InvalidFileError: ``path`` cannot be written (its folder is missing, it is a folder, ...).
    """
    from safetensors.torch import save_file

    patch = _require_patch(model, "tmcore.save")
    red = patch.reducer
    metadata = {
        "format": _FORMAT,
        "reducer": red.name,
        "config": red.config.model_dump_json(),
        "model": patch.runtime.info.model_dump_json(),
        "full_length": json.dumps(patch.runtime.full_length),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in red.state_tensors().items()}
    target = Path(path)
    if not target.parent.is_dir():
        raise InvalidFileError(f"cannot save to {path}: the folder {target.parent} does not exist")
    if target.is_dir():
        raise InvalidFileError(
            f"cannot save to {path}: it is a folder; give a file name, e.g. {target / 'reducer.safetensors'}"
        )
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError as exc:
        raise InvalidFileError(f"cannot save to {path}: {exc.strerror or exc}") from None


def load(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the reducer saved by `save` to ``model`` (replacing any), with its learned state.

    Raises:
        InvalidFileError: the file is missing, unreadable or not a tmcore reducer file, or its config
            or learned state is invalid. Errors about this model (no adapter, another number of
            blocks, ...) keep their class and name the file. The model is then left as it was.
    """
    name, config, tensors, full_length = _read(path, tensors=True)
    # Build and load the learned state first: a file for another model (e.g. another number of
    # blocks) raises before the model is touched.
    try:
        patch = _build(model, name, config, replace=True, full_length=full_length)
        patch.reducer.load_state_tensors(tensors)
    except InvalidConfigError as exc:
        raise InvalidFileError(f"{path}: {exc}") from None
    except TmcoreError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    _install(model, patch)
    return model


def read_saved(path: str | Path, tensors: bool = True) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(reducer name, config, learned-state tensors)`` of a file written by `save`; with
    ``tensors=False`` the tensors are not read (``{}``).

    Raises:
        InvalidFileError: missing, unreadable, or not a tmcore reducer file.
    """
    name, config, state, _ = _read(path, tensors)
    return name, config, state


def _read(path: str | Path, tensors: bool) -> tuple[str, dict[str, Any], dict[str, Any], bool]:
    """``(reducer name, config, tensors, full_length)`` of a tmcore reducer file, checked."""
    from safetensors import SafetensorError, safe_open

    what = not_a_regular_file(path)
    if what:
        raise InvalidFileError(f"cannot load {path}: it {what}; expected a file written by tmcore.save")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:  # truncated, corrupt, not safetensors
        raise InvalidFileError(
            f"cannot load {path}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "expected a file written by tmcore.save"
        ) from None
    if metadata.get("format") != _FORMAT:
        raise InvalidFileError(
            f"{path}: not a tmcore reducer file (format {metadata.get('format')!r}, expected {_FORMAT!r})"
        )
    name = metadata.get("reducer")
    if not name:
        raise InvalidFileError(f"{path}: the metadata names no reducer (no 'reducer' entry)")
    config = _json_entry(path, metadata, "config", "{}", dict, "a JSON object of config values")
    full_length = _json_entry(path, metadata, "full_length", "false", bool, "true or false")  # older files: off
    return name, config, state, full_length


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def not_a_regular_file(path: str | Path) -> str | None:
    """What ``path`` is when it is no regular file to read ("does not exist", "is a character
    device (a symbolic link to /dev/zero)", ...), or ``None`` when it is one. ``Path.is_file`` says
    only no, and "does not exist" misleads for a device, a pipe or a broken link."""
    try:
        mode = os.stat(path).st_mode  # follows links: what would be read
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            return f"is a broken symbolic link to {os.readlink(path)}"
        return "does not exist"
    except OSError as exc:  # a loop of links, a folder it may not enter
        return f"cannot be reached ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    link = f" (a symbolic link to {os.readlink(path)})" if os.path.islink(path) else ""
    return f"is {kind}{link}"


def _json_entry(path: str | Path, metadata: dict[str, str], key: str, default: str, kind: type, allowed: str) -> Any:
    try:
        value = json.loads(metadata.get(key, default))
    except (ValueError, RecursionError):
        value = None  # not JSON: refused below like any value of the wrong kind
    if not isinstance(value, kind) or (kind is dict and not all(isinstance(k, str) for k in value)):
        shown = metadata.get(key, default)
        raise InvalidFileError(f"{path}: metadata {key}={shown[:200]!r}; allowed: {allowed}")
    return value


def reducers() -> Mapping[str, Registration]:
    """Installed reducers by name (sorted), each with its class, distribution and version::

    "tome" in tmcore.reducers()
    tmcore.reducers()["tome"].distribution   # 'tm-tome'
    """
    registry.ensure_loaded()
    return MappingProxyType(dict(sorted(registry.reducers.items())))


def adapters() -> Mapping[str, Registration]:
    """Installed adapters by name (sorted), each with its class, distribution and version."""
    registry.ensure_loaded()
    return MappingProxyType(dict(sorted(registry.adapters.items())))


def plugins() -> Mapping[str, PluginInfo]:
    """Installed plugin distributions by name (sorted), with their version, what each registers
    and any load error."""
    registry.ensure_loaded()
    return MappingProxyType(dict(sorted(registry.plugins.items())))
