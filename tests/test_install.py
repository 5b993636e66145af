"""The install a user does: wheels built from this repo, installed into a fresh virtual
environment (no editable installs, no repo on the path), then the README's one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DISTS = (
    ".",
    "adapters/tm-timm",
    "adapters/tm-transformers",
    "adapters/tm-diffusers",
    "plugins/tm-pitome",
    "plugins/tm-ltmp",
)
# left out of the copies that are built: setuptools' and pip's leftovers, caches, environments
NEVER_COPIED = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".hypothesis"
)
# and from the root distribution, the other distributions and what is not the package
NOT_IN_ROOT = {"plugins", "adapters", "tests", "scripts", "docs"}

ONE_LINE = """
import sys, timm, torch, tmcore
assert "/env/" in tmcore.__file__ and "{repo}" not in sys.path, (tmcore.__file__, sys.path)
model = timm.create_model("vit_tiny_patch16_224", depth=4).eval()
tmcore.apply(model, "pitome", ratio=0.9)
with torch.no_grad(), tmcore.trace(model) as t:
    out = model(torch.randn(2, 3, 224, 224))
assert out.shape == (2, 1000) and t.token_counts[-1] < t.token_counts[0], t.token_counts
print("one line ok", t.token_counts)
"""


def _copy(dist: str, into: Path) -> Path:
    """A copy of the distribution folder ``dist`` to build from: setuptools writes ``build/`` and
    ``*.egg-info`` next to the sources it builds, and the checkout is to stay as it was."""
    source = REPO / dist

    def ignore(folder: str, names: list[str]) -> set[str]:
        left_out = set(NEVER_COPIED(folder, names))
        if dist == "." and Path(folder) == source:  # only at the top: tmcore/templates has tests/ folders
            left_out |= NOT_IN_ROOT & set(names)
        return left_out

    return Path(shutil.copytree(source, into / ("tmcore" if dist == "." else Path(dist).name), ignore=ignore))


def _build_outputs() -> dict[str, list[tuple[str, int]]]:
    """Each distribution folder's ``build/`` tree, where it has one: its paths with their times of
    change (a build into the checkout rewrites the files an earlier one left)."""
    return {
        dist: sorted((str(p.relative_to(REPO)), p.stat().st_mtime_ns) for p in (REPO / dist / "build").rglob("*"))
        for dist in DISTS
        if (REPO / dist / "build").exists()
    }


def _run(cmd: list, cwd: Path, timeout: int = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_pip_install_tmcore_tm_pitome_tm_ltmp_in_a_fresh_environment(tmp_path):
    """``pip install tmcore`` (then ``tm-pitome tm-ltmp`` and timm) from wheels of this repo into a
    fresh environment: the adapters come along inactive, then the README's line, ``tmcore
    plugins`` and ``tmcore bench`` work."""
    wheels = tmp_path / "wheels"
    builds_before = _build_outputs()  # left by an earlier `pip install` or `make`: not this test's to remove
    sources = tmp_path / "sources"
    for dist in DISTS:  # from a copy, with the venv's setuptools: no download
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                wheels,
                _copy(dist, sources),
            ],
            tmp_path,
        )
    assert _build_outputs() == builds_before, "building wrote into the checkout"
    files = {p.name.split("-")[0].replace("_", "-"): p for p in wheels.glob("*.whl")}
    assert set(files) == {"tmcore", "tm-timm", "tm-transformers", "tm-diffusers", "tm-pitome", "tm-ltmp"}, files
    env = tmp_path / "env"
    _run([sys.executable, "-m", "venv", env], tmp_path)
    py = env / "bin" / "python"
    # our distributions from these wheel files only; torch, timm and the rest as the dev constraints pin them
    pip = [py, "-m", "pip", "install", "-q", "-c", REPO / "constraints-dev.txt"]
    adapters = [files["tm-timm"], files["tm-transformers"], files["tm-diffusers"]]
    core = [f"tmcore[cli] @ {files['tmcore'].as_uri()}", *adapters]
    _run([*pip, *core], tmp_path, timeout=900)
    # `pip install tmcore` alone: the three adapters, no framework, each shown inactive
    installed = _run([py, "-m", "pip", "list", "--format=freeze"], tmp_path).lower()
    assert all(f"tm-{a}==0.1.0" in installed for a in ("timm", "transformers", "diffusers")), installed
    assert all(f"\n{lib}==" not in installed for lib in ("timm", "transformers", "diffusers")), installed
    alone = {p["distribution"]: p for p in json.loads(_run([env / "bin" / "tmcore", "plugins", "--json"], tmp_path))}
    for lib in ("timm", "transformers", "diffusers"):
        assert alone[f"tm-{lib}"]["status"] == f"inactive: {lib} not installed", alone
    _run([*pip, files["tm-pitome"], files["tm-ltmp"], "timm"], tmp_path, timeout=900)
    assert "one line ok" in _run([py, "-c", ONE_LINE.replace("{repo}", str(REPO))], tmp_path)
    plugins = _run([env / "bin" / "tmcore", "plugins", "--json"], tmp_path)
    rows = {p["distribution"]: p for p in json.loads(plugins)}
    assert set(rows) == {"tm-timm", "tm-transformers", "tm-diffusers", "tm-pitome", "tm-ltmp"}, rows
    assert (
        rows["tm-timm"]["status"] == "ok"
        and rows["tm-transformers"]["status"] == "inactive: transformers not installed"
    )
    bench = _run(
        [
            env / "bin" / "tmcore",
            "bench",
            "--reducer",
            "pitome:ratio=0.9",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--batch-size",
            "8",
        ],
        tmp_path,
    )
    assert "pitome" in bench and "fmnist-vit" in bench, bench
    assert _build_outputs() == builds_before, "the test left build/ output in the checkout"
