"""``tmcore new-plugin``: a generated reducer and a generated adapter install with pip, register
through their entry points and pass their own tests (tmcore's conformance suites) and ruff as
written; the reducer matrix passes on the generated adapter's models; bad requests fail in one
line, before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tmcore import TmcoreError
from tmcore.cli import main
from tmcore.registry import registry
from tmcore.scaffold import KINDS, MAX_NAME_LENGTH, ScaffoldError, dist_name, new_plugin, registry_name

REPO = Path(__file__).resolve().parents[1]
NAMES = {"reducer": "scaffold_demo_merge", "adapter": "scaffold_demo_vit"}
FILES = {
    "reducer": {"reducer.py"},
    "adapter": {"adapter.py", "model.py"},
}


def _python(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600, check=False
    )


def _output(result: subprocess.CompletedProcess, limit: int = 6000) -> str:
    return (result.stdout + result.stderr)[-limit:]


def _pytest(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """pytest in a fresh interpreter that sees the venv plus the private ``site`` folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    return _python("-m", "pytest", "-q", "-p", "no:cacheprovider", *args, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """``kind -> (generated project, the site folder pip installed it into)``, made once per kind.
    pip writes to the private folder only: the venv is never touched."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in made:
            root = tmp_path_factory.mktemp(kind)
            project = new_plugin(NAMES[kind], root, adapter=kind == "adapter")
            site = root / "site"
            pip = ("-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--no-build-isolation")
            result = _python(*pip, "--no-index", "--target", str(site), str(project))
            assert result.returncode == 0, _output(result)
            made[kind] = (project, site)
        return made[kind]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_generated_plugin_installs_registers_and_passes_its_tests(kind, installed, monkeypatch):
    name = NAMES[kind]
    project, site = installed(kind)
    monkeypatch.syspath_prepend(str(site))
    try:
        registry.reload()
        table = registry.reducers if kind == "reducer" else registry.adapters
        assert name in table, f"{name} not discovered; plugins: {sorted(registry.plugins)}"
        assert table[name].distribution == dist_name(name)
        assert table[name].obj.__module__ == f"tm_{name}.{kind}"
        assert sys.modules[f"tm_{name}"].__file__.startswith(str(site))
    finally:
        monkeypatch.undo()
        for module_name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", "")).startswith(str(site)):
                del sys.modules[module_name]
        registry.reload()
    assert name not in registry.reducers and name not in registry.adapters
    result = _pytest(site, str(project / "tests"), cwd=project.parent)
    assert result.returncode == 0 and " passed" in result.stdout, _output(result)


@pytest.mark.slow
def test_every_reducer_passes_its_conformance_suite_on_a_generated_adapter(installed):
    """The repo's matrix (every installed reducer's conformance suite) on the generated adapter's
    class-token ViT (its average-pooled model runs in the generated plugin's own tests)."""
    _, site = installed("adapter")
    selected = f"{NAMES['adapter']}:vit"  # in the test ids, e.g. [scaffold_demo_vit:vit]
    result = _pytest(site, str(REPO / "tests" / "test_matrix.py"), "-k", selected, cwd=REPO)
    assert result.returncode == 0 and " passed" in result.stdout, _output(result)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["x", "two_parts", "a" * MAX_NAME_LENGTH])
def test_the_generated_files_are_ruff_clean(kind, name, tmp_path, capsys):
    """The templates' lines with a name in them stay within 120 characters for the longest name."""
    argv = ["new-plugin", name, "--dir", str(tmp_path)] + (["--adapter"] if kind == "adapter" else [])
    assert main(argv) == 0
    project = tmp_path / dist_name(name)
    assert capsys.readouterr().out.startswith(f"wrote {project}/: the {kind} plugin {name!r}")
    for args in (["check"], ["format", "--check"]):
        result = _python("-m", "ruff", *args, "--no-cache", str(project))
        assert result.returncode == 0, _output(result)


@pytest.mark.parametrize("kind", KINDS)
def test_the_generated_tree(kind, tmp_path):
    project = new_plugin("tree_probe", tmp_path, adapter=kind == "adapter")
    assert project == tmp_path / "tm-tree-probe"
    files = {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()}
    package = {f"tm_tree_probe/{f}" for f in {"__init__.py", "plugin.py", *FILES[kind]}}
    tests = {"tests/test_conformance.py", "tests/test_tree_probe.py"}
    assert files == {".gitignore", "README.md", "pyproject.toml", *package, *tests}
    pyproject = (project / "pyproject.toml").read_text()
    for line in (
        'name = "tm-tree-probe"',
        'version = "0.1.0"',
        'dependencies = ["tmcore>=0.1,<0.2"]',
        'test = ["tmcore[testing]"]',
        '[project.entry-points.tmcore]\ntree_probe = "tm_tree_probe.plugin"',
    ):
        assert line in pyproject
    conformance = (project / "tests" / "test_conformance.py").read_text()
    assert f'{kind} = "tree_probe"' in conformance
    assert "$" not in "".join(p.read_text() for p in project.rglob("*") if p.is_file())


MALFORMED = ["MyMethod", "my-method", "1st", "_x", "", "a" * (MAX_NAME_LENGTH + 1), "méthode"]
# distribution names whose reducer name would be malformed
MALFORMED += ["tm-", "tm-Acme", "tm-1st", "tm--x", "tm-" + "a" * (MAX_NAME_LENGTH + 1), "tm_acme-x", "TM-acme"]


@pytest.mark.parametrize(
    "given, name",
    [("tm-acme", "acme"), ("tm-my-method", "my_method"), ("tm-my_method", "my_method"), ("my_method", "my_method")],
)
def test_the_distribution_name_is_accepted_too(given, name, tmp_path, capsys):
    """People type what they will ``pip install``: tm-my-method is the plugin my_method."""
    assert registry_name(given) == name
    assert main(["new-plugin", given, "--dir", str(tmp_path)]) == 0
    project = tmp_path / dist_name(name)
    assert [p.name for p in tmp_path.iterdir()] == [project.name]
    assert f'[project.entry-points.tmcore]\n{name} = "tm_{name}.plugin"' in (project / "pyproject.toml").read_text()
    assert (project / f"tm_{name}" / "plugin.py").is_file()
    assert capsys.readouterr().out.startswith(
        f"wrote {project}/: the reducer plugin {name!r} (distribution {project.name})"
    )


def test_the_python_api_takes_the_distribution_name(tmp_path):
    assert new_plugin("tm-acme", tmp_path, adapter=True) == tmp_path / "tm-acme"
    assert 'acme = "tm_acme.plugin"' in (tmp_path / "tm-acme" / "pyproject.toml").read_text()


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_name_is_refused_in_one_line(name, tmp_path, capsys):
    assert main(["new-plugin", name, "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tmcore new-plugin: error: name {name!r}: allowed: a lowercase identifier, [a-z][a-z0-9_]*")
    assert err.count("\n") == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "name, adapter, taken",
    [
        ("tome", True, "reducer 'tome' is already registered by tm-tome"),
        ("timm", False, "adapter 'timm' is already registered by tm-timm"),
    ],
)
def test_a_taken_name_is_refused_in_one_line(name, adapter, taken, tmp_path, capsys):
    """Whatever kind is asked for: a reducer and an adapter of the same name would confuse."""
    registry.ensure_loaded()
    if name not in registry.reducers and name not in registry.adapters:
        pytest.skip(f"nothing registers {name!r} here")
    assert main(["new-plugin", name, "--dir", str(tmp_path)] + (["--adapter"] if adapter else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tmcore new-plugin: error: name {name!r} is taken: {taken}") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_an_existing_folder_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "tm-fresh-name").mkdir()
    (tmp_path / "tm-fresh-name" / "mine.txt").write_text("mine")
    assert main(["new-plugin", "fresh_name", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"tmcore new-plugin: error: {str(tmp_path / 'tm-fresh-name')!r} already exists; " + (
        "pick another name or folder, or remove it first\n"
    )
    assert [p.name for p in (tmp_path / "tm-fresh-name").iterdir()] == ["mine.txt"]


def test_the_python_api_raises_tmcore_errors(tmp_path):
    assert issubclass(ScaffoldError, TmcoreError)
    with pytest.raises(ScaffoldError, match="name 'Bad': allowed: a lowercase identifier"):
        new_plugin("Bad", tmp_path)
    with pytest.raises(ScaffoldError, match="name 3: allowed"):
        new_plugin(3, tmp_path)
    # names that would break the generated code, caught before anything is written
    with pytest.raises(ScaffoldError, match="tm_plan/reducer.py would define Plan, which it also imports"):
        new_plugin("plan", tmp_path)
    with pytest.raises(ScaffoldError, match="tm_none/__init__.py would not compile"):
        new_plugin("none", tmp_path)
    with pytest.raises(ScaffoldError, match="two of its files would be tests/test_conformance.py"):
        new_plugin("conformance", tmp_path, adapter=True)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ScaffoldError, match="is not a directory; allowed: a folder to write tm-fine/ into"):
        new_plugin("fine", tmp_path / "a_file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert new_plugin("fine", tmp_path / "new" / "folder") == tmp_path / "new" / "folder" / "tm-fine"
