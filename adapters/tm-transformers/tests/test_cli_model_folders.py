"""`tmcore bench` and `tmcore eval` on model folders they must not load: a folder that brings its
own Python code (transformers would offer to run it, and an answer on stdin would), and one whose
config names something other than a transformers model class. One line, exit 2, nothing run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tmcore.cli import load_model, main

tf = pytest.importorskip("transformers")


def _one_line(err: str, command: str, words: list[str]) -> None:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tmcore {command}: error:"), err
    for word in words:
        assert word in lines[0], (word, err)


def _tiny_bert(folder: Path, **config_changes: object) -> Path:
    """A real (random) BERT saved as transformers saves it, then its config.json edited."""
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32,
    )  # fmt: skip
    tf.BertModel(config).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved.update(config_changes)
    (folder / "config.json").write_text(json.dumps(saved))
    return folder


def _evil_folder(root: Path) -> tuple[Path, Path]:
    """``(model folder, marker)``: a folder whose config asks for its own code, and the file that
    code writes the moment it is imported."""
    folder, marker = root / "evil-model", root / "code-ran"
    folder.mkdir()
    config = {
        "model_type": "evil_model",
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
        "architectures": ["EvilModel"],
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    return folder, marker


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_a_folder_with_its_own_code_is_refused_and_its_code_never_runs(command, tmp_path):
    folder, marker = _evil_folder(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-m", "tmcore.cli", command, "--model", f"hf:{folder}", "--reducer", "tome:r=2"],
        input="y\n" * 20,  # what a user (or `yes |`) answers to transformers' "run the custom code?"
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert not marker.exists(), "the folder's code ran"
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    _one_line(result.stderr, command, [f"--model '{folder}'", "auto_map", "tmcore never runs code from a model folder"])


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"model_type": "evil_model"}, ["model_type 'evil_model' is not one transformers", "never runs code"]),
        ({"auto_map": {"AutoModel": "evil.EvilModel"}}, ["config.json", "auto_map", "never runs code"]),
    ],
    ids=["unknown-model-type", "auto-map-on-a-known-type"],
)
def test_either_sign_of_custom_code_is_enough_to_refuse(changes, words, tmp_path, capsys):
    folder = _tiny_bert(tmp_path / "bert", **changes)
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["bench", "--model", f"hf:{folder}"]) == 2
    _one_line(capsys.readouterr().err, "bench", [f"--model '{folder}'", *words])


def test_a_tokenizer_with_its_own_code_is_refused(tmp_path, capsys):
    folder = _tiny_bert(tmp_path / "bert")
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    capsys.readouterr()
    assert main(["bench", "--model", f"hf:{folder}", "--reducer", "tome:r=2", "--rounds", "1", "--warmup", "0"]) == 2
    _one_line(capsys.readouterr().err, "bench", ["tokenizer_config.json", "auto_map", "never runs code"])


@pytest.mark.parametrize("command", ["bench", "eval"])
@pytest.mark.parametrize("name", ["pipeline", "AutoTokenizer", "NoSuchModel", "__class__"])
def test_architectures_must_name_a_transformers_model_class(name, command, tmp_path, capsys):
    """``pipeline`` is a function, ``AutoTokenizer`` a class but no model: neither is called."""
    folder = _tiny_bert(tmp_path / "bert", architectures=[name])
    capsys.readouterr()
    assert main([command, "--model", f"hf:{folder}", "--reducer", "tome:r=2"]) == 2
    words = [f"--model '{folder}'", f"architectures names {name!r}", "BertForSequenceClassification", "AutoModel"]
    _one_line(capsys.readouterr().err, command, words)


def test_a_model_class_or_none_still_loads(tmp_path):
    named = _tiny_bert(tmp_path / "named", architectures=["BertModel"])
    assert type(load_model(f"hf:{named}")) is tf.BertModel
    unnamed = _tiny_bert(tmp_path / "unnamed", architectures=None)
    assert type(load_model(f"hf:{unnamed}")) is tf.BertModel  # AutoModel for model_type bert
