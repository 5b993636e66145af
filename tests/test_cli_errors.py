"""A bad command line is one clear line on stderr and exit status 2, never a traceback, and it is
caught before any model is loaded or timed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tmcore.cli import main
from tmcore.errors import TmcoreError

pytest.importorskip("timm")
pytest.importorskip("torchvision")

MODEL = ["--model", "timm:test_vit"]


def _png(path: Path, size: int = 32) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise((size, size), 64).convert("RGB").save(path)


def _float_tiff(path: Path) -> None:
    """A 32-bit float image (PIL mode F): its values have no known range to map to 8 bits."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)).save(path)


def _unwritable_dir(root: Path) -> str | None:
    """A directory this process cannot write in (root writes anywhere but in /proc), or None."""
    locked = root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    for folder in (str(locked), "/proc/1"):
        if os.path.isdir(folder) and not os.access(folder, os.W_OK):
            return folder
    return None


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Bad inputs of every kind, as paths to substitute into the command lines."""
    root = tmp_path_factory.mktemp("bad-inputs")
    _png(root / "image.png")
    (root / "notes.png").write_text("not an image")
    (root / "empty").mkdir()
    (root / "no-images" / "shirts").mkdir(parents=True)
    (root / "no-images" / "shirts" / "readme.txt").write_text("no image here")
    _png(root / "broken" / "shirts" / "ok.png")
    (root / "broken" / "shirts" / "bad.png").write_text("text with a .png name")
    (root / "weights.pth").write_text("not a checkpoint")
    (root / "latin-1.txt").write_bytes("Café au lait.\n".encode("latin-1"))
    (root / "reducer.safetensors").write_text("not a reducer file")
    _float_tiff(root / "float.tif")
    _float_tiff(root / "float-folder" / "shirts" / "f.tif")
    (root / "zero.safetensors").symlink_to("/dev/zero")  # reading it would never end
    os.mkfifo(root / "pipe")  # opening it would wait for a writer
    return {"tmp": str(root), "locked": _unwritable_dir(root) or ""}


# (argv, words the one line must hold: the option, the value, what is allowed); {tmp} is `files`' root
UPFRONT = [
    pytest.param(["bench", "--threads", "-1"], ["--threads", "-1", "an integer >= 0", "torch's default"], id="threads"),
    pytest.param(["bench", "--rounds", "0"], ["--rounds", "0", "an integer >= 1"], id="rounds"),
    pytest.param(["bench", "--warmup", "-1"], ["--warmup", "-1", "an integer >= 0"], id="warmup"),
    pytest.param(["bench", "--batch-size", "0"], ["--batch-size", "0", "an integer >= 1"], id="bench-batch-size"),
    pytest.param(["eval", "--batch-size", "ten"], ["--batch-size", "'ten'", "not an integer"], id="eval-batch-size"),
    pytest.param(["eval", "--workers", "-1"], ["--workers", "-1", "an integer >= 0"], id="workers"),
    pytest.param(["visualize", "{tmp}/image.png", "--scale", "-1"], ["--scale", "-1", "an integer >= 0"], id="scale"),
    pytest.param(["bench", "--device", "nonsense"], ["--device", "'nonsense'", "not a torch device", "cpu"], id="dev"),
    pytest.param(["eval", "--device", "meta"], ["--device", "'meta'", "hold no data", "allowed: cpu"], id="meta"),
    pytest.param(["bench", "--device", "cuda:99"], ["--device", "'cuda:99'", "allowed: cpu"], id="cuda-99"),
    pytest.param(
        ["bench", "--device", "cuda"],
        ["--device", "'cuda'", "no cuda device is available here"],
        id="cuda",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available here"),
    ),
    pytest.param(
        ["bench", "--json", "{tmp}/missing/rows.json"],
        ["--json", "{tmp}/missing/rows.json", "does not exist", "existing, writable directory"],
        id="json-missing-dir",
    ),
    pytest.param(["bench", "--csv", "{tmp}"], ["--csv", "'{tmp}' is a directory"], id="csv-is-a-directory"),
    pytest.param(
        ["bench", "--plot", "{tmp}/plot.txt"], ["--plot", "{tmp}/plot.txt", "'.txt'", ".png, .ps"], id="plot-format"
    ),
    pytest.param(
        ["bench", "--json", "{locked}/rows.json"],
        ["--json", "{locked}/rows.json", "not writable"],
        id="json-unwritable",
    ),
    pytest.param(
        ["eval", "--json", "{tmp}/missing/r.json"], ["--json", "{tmp}/missing/r.json", "does not exist"], id="eval-json"
    ),
    pytest.param(
        ["visualize", "{tmp}/image.png", "--out", "{tmp}/missing/g.png"],
        ["--out", "{tmp}/missing/g.png", "does not exist"],
        id="out-missing-dir",
    ),
    pytest.param(["eval", "--data", "{tmp}/empty"], ["--data", "{tmp}/empty", "no class folders"], id="data-empty"),
    pytest.param(
        ["eval", "--data", "{tmp}/no-images"],
        ["--data", "{tmp}/no-images", "no images in class folder 'shirts'", ".png"],
        id="data-no-images",
    ),
    pytest.param(
        ["eval", *MODEL, "--data", "{tmp}/broken"],
        ["--data", "{tmp}/broken/shirts/bad.png", "not a readable image"],
        id="data-broken-image",
    ),
    pytest.param(
        ["bench", *MODEL, "--checkpoint", "/no/such/file"], ["--checkpoint", "/no/such/file", "no such file"], id="ckpt"
    ),
    pytest.param(
        ["bench", *MODEL, "--load", "{tmp}/reducer.safetensors"],
        ["--load", "{tmp}/reducer.safetensors", "not a readable safetensors file"],
        id="load-not-a-reducer-file",
    ),
    pytest.param(
        ["bench", "--texts", "{tmp}/latin-1.txt"], ["--texts", "{tmp}/latin-1.txt", "not UTF-8"], id="texts-encoding"
    ),
    pytest.param(
        ["visualize", "{tmp}/notes.png", *MODEL], ["IMAGE", "{tmp}/notes.png", "not a readable image"], id="image"
    ),
    pytest.param(
        ["visualize", "{tmp}/float.tif", *MODEL],
        ["IMAGE", "{tmp}/float.tif", "mode 'F'", "range of values is unknown", "allowed: an 8-bit image"],
        id="float-image",
    ),
    pytest.param(
        ["bench", *MODEL, "--reducer", "tome:r=8;r=2"],
        ["--reducer", "'tome:r=8;r=2'", "key 'r' is given twice", "r=V1,V2"],
        id="reducer-key-twice",
    ),
    pytest.param(
        ["bench", *MODEL, "--load", "{tmp}/zero.safetensors"],
        ["--load", "{tmp}/zero.safetensors", "is a character device (a symbolic link to /dev/zero)"],
        id="load-dev-zero",
    ),
    pytest.param(
        ["bench", *MODEL, "--checkpoint", "{tmp}/pipe"],
        ["--checkpoint", "{tmp}/pipe", "is a named pipe", "allowed: a regular file"],
        id="checkpoint-fifo",
    ),
]
# found while loading the model: the file exists but holds no weights for it
LATE = [
    pytest.param(
        ["bench", *MODEL, "--checkpoint", "{tmp}/weights.pth"],
        ["--checkpoint", "{tmp}/weights.pth", "timm could not load it into test_vit"],
        id="ckpt-not-weights",
    ),
    pytest.param(
        ["eval", *MODEL, "--data", "{tmp}/float-folder"],
        ["--data", "{tmp}/float-folder/shirts/f.tif", "mode 'F'", "range of values is unknown"],
        id="data-float-image",
    ),
]


def _fill(items: list[str], files: dict[str, str]) -> list[str]:
    if any("{locked}" in item for item in items) and not files["locked"]:
        pytest.skip("no directory here that this process cannot write in")
    return [item.format(**files) for item in items]


def _check_one_line(command: str, err: str, words: list[str]) -> None:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    assert lines[0].startswith(f"tmcore {command}: error:"), err
    for word in words:
        assert word in lines[0], (word, err)


@pytest.mark.parametrize("argv, words", UPFRONT + LATE)
def test_the_command_prints_one_clear_line_and_exits_2(argv, words, files, tmp_path):
    argv, words = _fill(argv, files), _fill(words, files)
    result = subprocess.run(
        [sys.executable, "-m", "tmcore.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,  # visualize's default --out (groups.png) is checked in the working directory
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""  # nothing ran: no table, no progress
    _check_one_line(argv[0], result.stderr, words)


@pytest.mark.parametrize("argv, words", UPFRONT)
def test_bad_input_is_found_before_any_model_is_loaded(argv, words, files, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("tmcore.cli.load_model", no_model)
    monkeypatch.chdir(files["tmp"])
    assert main(_fill(argv, files)) == 2
    _check_one_line(argv[0], capsys.readouterr().err, _fill(words, files))


def test_an_image_damaged_after_its_header_is_named(tmp_path, capsys):
    _png(tmp_path / "shirts" / "ok.png")
    whole = (tmp_path / "shirts" / "ok.png").read_bytes()
    (tmp_path / "shirts" / "cut.png").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    assert main(["eval", *MODEL, "--data", str(tmp_path)]) == 2
    _check_one_line("eval", capsys.readouterr().err, [f"'{tmp_path}/shirts/cut.png' is not a readable image"])


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
        (["bench", "--dtype", "float64"], ["--dtype", "'float64'", "'float32'"]),
        (["visualize", "{tmp}/image.png", "--model", "hf:{tmp}"], ["--model", "visualize draws", "timm:NAME"]),
        (["visualize", "{tmp}/image.png", "--out", "{tmp}/groups.txt"], ["--out", "'.txt'", ".png"]),
    ],
)
def test_other_usage_errors_name_the_subcommand(argv, words, files, capsys):
    assert main(_fill(argv, files)) == 2
    _check_one_line(argv[0], capsys.readouterr().err, _fill(words, files))


def test_a_message_over_several_lines_is_printed_as_one(capsys, monkeypatch):
    def fail(args):
        raise TmcoreError("first line\n  second line\n")

    monkeypatch.setattr("tmcore.cli._cmd_plugins", fail)
    assert main(["plugins"]) == 2
    assert capsys.readouterr().err == "tmcore plugins: error: first line second line\n"


def test_a_gpu_index_beyond_the_machine_is_refused(capsys, monkeypatch):
    monkeypatch.setattr("tmcore.cli._accelerators", lambda: {"cuda": 2})  # as on a machine with two GPUs
    assert main(["bench", "--device", "cuda:2"]) == 2
    words = ["--device", "'cuda:2'", "there are 2 devices of type cuda here", "allowed: cpu, cuda, cuda:0 to cuda:1"]
    _check_one_line("bench", capsys.readouterr().err, words)
