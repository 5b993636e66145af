"""``tmcore new-plugin``: a new reducer or adapter distribution, written from the templates in
``tmcore/templates`` and ready to test, build and publish.

A template is a file ending in ``.tmpl`` (so that pytest and ruff leave the originals alone),
filled with `string.Template` from:

    $name      the registry name, e.g. ``my_method`` (also the entry-point name)
    $package   the import package, ``tm_my_method``
    $dist      the distribution, ``tm-my-method`` (PEP 503 normalised, as the registry reports it)
    $Class     the class-name stem, ``MyMethod``

In template paths, ``package`` stands for $package, ``NAME`` for $name, and ``gitignore`` for
``.gitignore`` (a dotfile would not be package data). ``common/`` goes into every kind.
"""

from __future__ import annotations

import ast
import re
import shutil
import string
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING

from tmcore.errors import TmcoreError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["ScaffoldError", "new_plugin", "check_name", "registry_name", "dist_name", "KINDS", "MAX_NAME_LENGTH"]

KINDS = ("reducer", "adapter")
MAX_NAME_LENGTH = 32
"""Longer names would push generated lines past the 120-character limit of the templates' ruff settings."""

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SUFFIX = ".tmpl"
_DESCRIPTIONS = {
    "reducer": "The $Class token reducer as a tmcore plugin",
    "adapter": "tmcore adapter for the $Class backbone family",
}


class ScaffoldError(TmcoreError, ValueError):
    """`new_plugin` refused: a malformed or taken name, or a target folder that exists."""


def check_name(name: str) -> None:
    """Raise `ScaffoldError` unless ``name`` is a well-formed plugin name (it may still be taken)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise ScaffoldError(
            f"name {name!r}: allowed: a lowercase identifier, [a-z][a-z0-9_]*, at most {MAX_NAME_LENGTH} "
            "characters, e.g. my_method (it is the name users pass to tmcore.apply), or the distribution "
            "name tm-my-method"
        )


def registry_name(name: str) -> str:
    """The registry name of a plugin given by it (``my_method``) or by its distribution name
    (``tm-my-method``, what users ``pip install``); `ScaffoldError` naming ``name`` as given when
    it is neither."""
    if isinstance(name, str) and name.startswith("tm-"):
        stem = name[3:].replace("-", "_")
        if _NAME.fullmatch(stem) and len(stem) <= MAX_NAME_LENGTH:
            return stem
    check_name(name)  # refused as typed: a distribution name, with its "-", is never an identifier
    return name


def dist_name(name: str) -> str:
    """The distribution (and folder) name of plugin ``name``: ``tm-`` + the name, ``_`` as ``-``."""
    return "tm-" + name.replace("_", "-")


def _taken(name: str, dist: str) -> str | None:
    """Why ``name`` cannot be used in this environment, or ``None``."""
    from tmcore.registry import KNOWN_REDUCERS, registry

    registry.ensure_loaded()
    for kind, table in (("reducer", registry.reducers), ("adapter", registry.adapters)):
        if name in table:
            reg = table[name]
            return f"{kind} {name!r} is already registered by {reg.distribution} {reg.version}"
    if name in KNOWN_REDUCERS:
        return f"{name!r} is the name of the project's reducer {KNOWN_REDUCERS[name]}"
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    return f"a distribution {dist} {version} is already installed"


def _mapping(name: str, kind: str) -> dict[str, str]:
    values = {
        "name": name,
        "package": "tm_" + name,
        "dist": dist_name(name),
        "Class": "".join(part.capitalize() for part in name.split("_")),
    }
    values["description"] = string.Template(_DESCRIPTIONS[kind]).substitute(values)
    return values


def _templates(folder: Traversable, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Traversable]]:
    """Every ``.tmpl`` file under ``folder``, with its path parts below it, in name order."""
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            found += _templates(entry, (*prefix, entry.name))
        elif entry.name.endswith(_SUFFIX):
            found.append(((*prefix, entry.name.removesuffix(_SUFFIX)), entry))
    return found


def _target_path(parts: tuple[str, ...], values: dict[str, str]) -> Path:
    names = {"package": values["package"], "gitignore": ".gitignore"}
    return Path(*(names.get(p, p).replace("NAME", values["name"]) for p in parts))


def _render(kind: str, name: str) -> tuple[dict[Path, str], str | None]:
    """The files of a new ``kind`` plugin called ``name`` (relative path -> text), and why they
    would not work, or ``None``."""
    values = _mapping(name, kind)
    root = resources.files("tmcore") / "templates"
    files: dict[Path, str] = {}
    for sub in ("common", kind):
        for parts, entry in _templates(root / sub):
            path = _target_path(parts, values)
            if path in files:  # e.g. tests/test_NAME.py for the name "conformance"
                return files, f"two of its files would be {path.as_posix()}"
            files[path] = string.Template(entry.read_text(encoding="utf-8")).substitute(values)
    return files, _broken(files)


def _broken(files: dict[Path, str]) -> str | None:
    """Why the generated code would not work: the name made a keyword of a class name (``none``
    -> ``None``), or a class the code defines shadows a name it imports (``plan`` would make a
    reducer class ``Plan`` over the imported `tmcore.Plan`); ``None`` when it is fine."""
    for path, text in files.items():
        if path.suffix != ".py":
            continue
        try:
            tree = ast.parse(text, filename=str(path))
        except SyntaxError as exc:
            return f"{path.as_posix()} would not compile ({exc.msg}, line {exc.lineno})"
        imported = {
            (alias.asname or alias.name).split(".")[0]
            for node in tree.body
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in imported:
                return f"{path.as_posix()} would define {node.name}, which it also imports"
    return None


def _exists(target: Path) -> ScaffoldError:
    return ScaffoldError(f"{str(target)!r} already exists; pick another name or folder, or remove it first")


def new_plugin(name: str, directory: str | Path = ".", adapter: bool = False) -> Path:
    """Write a new plugin distribution ``directory/tm-NAME/`` (``_`` in the name becomes ``-``).

    A reducer (default): ``pyproject.toml`` (entry point ``NAME = "tm_NAME.plugin"``),
    ``tm_NAME/`` (``reducer.py``, a working skeleton to replace with the method; ``plugin.py``, the
    hook), ``tests/`` (the conformance suite and an example unit test), ``README.md``,
    ``.gitignore``. With ``adapter=True``: an adapter for a stand-in ViT family shipped in
    ``tm_NAME/model.py``, with the adapter conformance suite. Both pass their tests as written.

    Args:
        name: the registry name, a lowercase identifier not registered by an installed plugin, or
            its distribution name: ``tm-my-method`` for ``my_method``.
        directory: where the plugin folder goes (created if missing).
        adapter: write an adapter instead of a reducer.

    Returns:
        The new plugin folder.

    Raises:
        ScaffoldError: the name is malformed or taken, the folder exists, or it cannot be written.
    """
    name = registry_name(name)
    kind = "adapter" if adapter else "reducer"
    directory = Path(directory)
    target = directory / dist_name(name)
    if directory.exists() and not directory.is_dir():
        raise ScaffoldError(f"{str(directory)!r} is not a directory; allowed: a folder to write {target.name}/ into")
    if target.exists():
        raise _exists(target)
    taken = _taken(name, target.name)
    if taken:
        raise ScaffoldError(f"name {name!r} is taken: {taken}; pick another name")
    files, problem = _render(kind, name)
    if problem:
        raise ScaffoldError(f"name {name!r} does not fit the {kind} template: {problem}; pick another name")
    try:
        target.mkdir(parents=True)
    except FileExistsError:  # made since the check above
        raise _exists(target) from None
    except OSError as exc:
        raise ScaffoldError(f"{str(target)!r}: cannot create it ({exc.strerror or exc})") from None
    try:
        for path, text in files.items():
            (target / path).parent.mkdir(parents=True, exist_ok=True)
            (target / path).write_text(text, encoding="utf-8")
    except OSError as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ScaffoldError(f"{str(target)!r}: cannot write it ({exc.strerror or exc})") from None
    return target
