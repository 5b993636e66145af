"""The tmcore command: argument parsing, every subcommand's help and errors, bench rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tmcore.bench import Setting, compare, variants, vit_macs
from tmcore.cli import CliError, main, parse_reducer_spec
from tmcore.errors import TmcoreError
from tmcore.registry import registry

pytest.importorskip("timm")


def test_reducer_spec_expands_value_lists():
    assert parse_reducer_spec("tome:r=4,8,12") == [("tome", {"r": 4}), ("tome", {"r": 8}), ("tome", {"r": 12})]
    assert parse_reducer_spec("tome:r=(16,-1);prop_attn=False") == [("tome", {"r": (16, -1), "prop_attn": False})]
    assert parse_reducer_spec("tome:r=[1,2],3") == [("tome", {"r": [1, 2]}), ("tome", {"r": 3})]
    assert parse_reducer_spec("pitome:ratio=0.9,0.95") == [("pitome", {"ratio": 0.9}), ("pitome", {"ratio": 0.95})]
    assert parse_reducer_spec("tome") == [("tome", {})]
    for bad in ("", "to me:r=1", "tome:r", "tome:=3", "tome:r="):
        with pytest.raises(CliError, match="--reducer"):
            parse_reducer_spec(bad)
    for twice in ("tome:r=8;r=2", "tome:r=8;prop_attn=False; r =2"):  # the last one would win, silently
        with pytest.raises(CliError, match=f"--reducer '{twice}': key 'r' is given twice"):
            parse_reducer_spec(twice)


def _sixteen_bit_gradient(path, mode: str):
    """A greyscale gradient over the whole 16-bit range, 0 to 65535, in ``path``."""
    import numpy as np
    from PIL import Image

    values = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    Image.fromarray(values if mode == "I;16" else values.astype(np.int32)).save(path)
    with Image.open(path) as image:
        assert image.mode == mode  # how this Pillow reads it back
    return values


@pytest.mark.parametrize("name, mode", [("gradient.png", "I;16"), ("gradient.tif", "I")])
def test_a_16_bit_image_is_scaled_to_8_bits_not_clipped(name, mode, tmp_path):
    import numpy as np

    from tmcore.evaluate import read_image

    values = _sixteen_bit_gradient(tmp_path / name, mode)
    image = read_image(str(tmp_path / name), "IMAGE")
    pixels = np.asarray(image).astype(int)
    assert image.mode == "L" and pixels.min() == 0 and pixels.max() == 255
    assert (np.diff(pixels, axis=1) >= 0).all()  # the ordering is kept
    assert (pixels == 255).mean() < 0.01  # clipping made 99.5 % of them 255
    assert (pixels == np.rint(values.astype(int) * 255 / 65535)).all()


def test_visualize_runs_on_a_16_bit_png(tmp_path, capsys):
    _sixteen_bit_gradient(tmp_path / "gradient.png", "I;16")
    out = tmp_path / "groups.png"
    argv = ["visualize", str(tmp_path / "gradient.png"), "--model", "timm:test_vit", "--style", "mean"]
    assert main([*argv, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.startswith(f"{out}: ")


@pytest.mark.parametrize("command", [[], ["plugins"], ["bench"], ["eval"], ["visualize"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: tmcore" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--model", "timm:not_a_model"], "timm has no model 'not_a_model'"),
        (["bench", "--model", "nonsense"], "expected a bundled model (fmnist-vit), timm:NAME"),
        (["bench", "--model", "timm:test_vit", "--reducer", "tome:r"], "'r' is not KEY=VALUE"),
        (["bench", "--model", "timm:test_vit", "--reducer", "tome:r=-2"], "r=-2: must be an int >= 0"),
        (["bench", "--model", "timm:test_vit", "--reducer", "tomecis:r=8"], "pip install tm-tomecis"),
        (["bench", "--model", "timm:test_vit", "--reducer", "ppt:threshold=nan"], "threshold=nan: must be a number"),
        (["eval", "--model", "timm:nope"], "timm has no model 'nope'"),
        (["eval", "--model", "timm:test_vit"], "--data is required"),
        (["eval", "--model", "timm:test_vit", "--data", "/no/such/dir"], "not a directory"),
        (["eval", "--reducer", "tome:r=1,2"], "give one setting"),
        (
            ["bench", "--model", "timm:resnet18", "--reducer", "tome:r=4"],
            "no installed adapter handles a model of class",
        ),
        (["eval", "--reducer", "tome:r"], "'r' is not KEY=VALUE"),
        (["eval", "--reducer", "nosuch:r=1"], "unknown reducer 'nosuch'"),
        (["visualize", "/no/such/image.png"], "argument IMAGE: '/no/such/image.png': no such file"),
        (["visualize", "docs/bench.png", "--reducer", "tome:r"], "'r' is not KEY=VALUE"),
        (["visualize", "docs/bench.png", "--reducer", "tome:r=(1"], "r='(1': must be an int"),
        (["visualize", "docs/bench.png", "--model", "timm:nope"], "timm has no model 'nope'"),
    ],
)
def test_bad_arguments_fail_with_a_clear_message(argv, message, capsys, monkeypatch):
    registry.ensure_loaded()
    monkeypatch.delitem(registry.reducers, "tomecis")  # as if tm-tomecis were not installed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tmcore {argv[0]}: error:") and message in err, err


def test_visualize_rejects_a_file_that_is_not_an_image(tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["visualize", str(bad), "--model", "timm:test_vit"]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {p["distribution"]: p for p in json.loads(capsys.readouterr().out)}
    assert rows["tm-tome"]["reducers"] == ["tome"] and rows["tm-timm"]["adapters"] == ["timm"]
    assert rows["tm-tome"]["version"] == "0.1.0" and rows["tm-tome"]["loaded"] and rows["tm-tome"]["error"] is None


def test_plugins_lists_distributions_left_out_by_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("TMCORE_DISABLE_PLUGINS", "tm-ppt")
    registry.reload()
    try:
        assert main(["plugins"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "tm-ppt" in out and "not loaded: disabled by TMCORE_DISABLE_PLUGINS=tm-ppt" in out
        assert "tm-tome │ 0.1.0 │ tome" in out
    finally:
        monkeypatch.delenv("TMCORE_DISABLE_PLUGINS")
        registry.reload()


def test_flop_ratio_of_tome_r13_on_deit_small_by_hand():
    counts = [197 - 13 * i for i in range(13)]
    base = 12 * (4 * 197 * 384**2 + 2 * 197**2 * 384 + 8 * 197 * 384**2)
    reduced = sum(4 * n * 384**2 + 2 * n * n * 384 + 8 * m * 384**2 for n, m in zip(counts, counts[1:]))
    assert vit_macs([197] * 13, 384) == base
    assert vit_macs(counts, 384) == reduced
    assert round(base / reduced, 2) == 1.72


def test_compare_rows_are_consistent():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    x = torch.randn(4, 3, 160, 160)
    rows = compare(
        variants(model, [Setting("tome", {"r": 4}), Setting("tome", {"r": 8})]),
        x,
        rounds=2,
        warmup=1,
        one_at_a_time=True,
    )
    assert [r.reducer for r in rows] == ["none", "tome", "tome"]
    assert rows[0].speedup == 1.0 and rows[0].flop_ratio == 1.0 and rows[0].tokens_out == 101
    assert [r.tokens_out for r in rows[1:]] == [101 - 6 * 4, 101 - 6 * 8]
    for r in rows:
        assert r.images_per_s > 0 and r.speedup > 0 and r.peak_mem_mb > 0 and r.single_images_per_s > 0
        assert r.speedup == pytest.approx(r.images_per_s / rows[0].images_per_s)
        assert r.flop_ratio == pytest.approx(rows[0].gmacs / r.gmacs)
    assert rows[1].flop_ratio < rows[2].flop_ratio
    assert tmcore_unpatched(model)


def test_compare_times_compiled_variants_apart_from_their_compilation():
    """Compiled against compiled: the first call of each is its compilation (one graph each, no
    graph break), no graph is compiled during the rounds, counts and FLOPs are eager's."""
    import timm

    from tmcore.bench import compiled
    from tmcore.testing.conformance import compile_counting_graphs

    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    x = torch.randn(2, 3, 160, 160)
    models = variants(model, [Setting("tome", {"r": 8})])
    eager = compare(models, x, rounds=1, warmup=0)
    with pytest.raises(TmcoreError, match="'fast' is not one of: default, reduce-overhead, max-autotune"):
        compiled(models, "fast")
    rows = compare([(s, compile_counting_graphs(m)[0]) for s, m in models], x, rounds=2, warmup=1)
    for row, ref in zip(rows, eager, strict=True):
        assert row.compile_s > 0 and row.graphs == 1 and row.recompiles == 0
        assert row.token_counts == ref.token_counts and row.gmacs == ref.gmacs
    assert all(r.compile_s is None and r.graphs is None for r in eager)


@pytest.mark.slow
def test_bench_command_compiles_with_inductor(capsys):
    argv = ["bench", "--model", "timm:test_vit", "--reducer", "tome:r=8", "--batch-size", "2"]
    assert main([*argv, "--rounds", "1", "--warmup", "0", "--compile"]) == 0
    out = capsys.readouterr().out
    assert "torch.compile(mode='default')" in " ".join(out.split())
    assert "recompiles" in out and "none [compiled]" in out and "tome r=8 [compiled]" in out
    assert main([*argv, "--compile", "fastest"]) == 2
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


def tmcore_unpatched(model):
    import tmcore

    return tmcore.get_patch(model) is None


def test_bench_command_writes_json_csv_and_plot(tmp_path, capsys):
    argv = [
        "bench",
        "--model",
        "timm:test_vit",
        "--reducer",
        "tome:r=4,8",
        "--batch-size",
        "4",
        "--rounds",
        "2",
        "--warmup",
        "1",
        "--json",
        str(tmp_path / "rows.json"),
        "--csv",
        str(tmp_path / "rows.csv"),
        "--plot",
        str(tmp_path / "plot.png"),
        "--one-at-a-time",
    ]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["reducer"], r["config"]) for r in rows] == [("none", {}), ("tome", {"r": 4}), ("tome", {"r": 8})]
    for r in rows:
        assert {"images_per_s", "speedup", "flop_ratio", "tokens_out", "agreement", "cosine"} <= r.keys()
        assert 0 <= r["agreement"] <= 1
    assert rows[0]["agreement"] == 1.0
    assert (tmp_path / "rows.csv").read_text().count("\n") == 4
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(r["single_images_per_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "tome r=8" in out and "batch gain" in out


def test_bench_loads_a_saved_reducer_file(tmp_path, capsys):
    import timm

    import tmcore

    saved = tmp_path / "tome-r6.safetensors"
    tmcore.save(tmcore.apply(timm.create_model("test_vit"), "tome", r=6), saved)
    argv = [
        "bench",
        "--model",
        "timm:test_vit",
        "--load",
        str(saved),
        "--batch-size",
        "2",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--json",
        str(tmp_path / "rows.json"),
    ]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["reducer"], r["config"], r["tokens_out"]) for r in rows] == [
        ("none", {}, 101),
        ("tome", {"r": 6, "prop_attn": None}, 101 - 36),
    ]
    assert "tome tome-r6.safetensors" in capsys.readouterr().out
    assert main(["bench", "--model", "timm:test_vit", "--load", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--load" in err and "no such file" in err


def test_without_timm_or_transformers_the_adapters_load_inactive():
    """``pip install tmcore`` brings the three adapters; without their frameworks they load, import
    no framework, and ``tmcore plugins`` says they are inactive."""
    script = (
        "import importlib.util, sys, warnings\n"
        "libs = ('timm', 'transformers', 'diffusers')\n"
        "for lib in libs: sys.modules[lib] = None  # as if not installed\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n in libs else real(n, *a)\n"
        "warnings.simplefilter('error')\n"
        "import tmcore\n"
        "from tmcore.cli import main\n"
        "assert sorted(tmcore.adapters()) == ['diffusers', 'timm', 'transformers'], tmcore.adapters()\n"
        "main(['plugins', '--json'])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {p["distribution"]: p for p in json.loads(result.stdout)}
    assert rows["tm-timm"]["status"] == "inactive: timm not installed"
    assert rows["tm-transformers"]["status"] == "inactive: transformers not installed"
    assert rows["tm-diffusers"]["status"] == "inactive: diffusers not installed"
    assert rows["tm-tome"]["status"] == "ok"
