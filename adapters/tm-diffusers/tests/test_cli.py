"""``tmcore bench --model diffusers:...``: model and pipeline folders, the shipped layouts, and the
one-line errors for what it cannot load."""

from __future__ import annotations

import json

import pytest

from tmcore.cli import diffusers_configs, main

diffusers = pytest.importorskip("diffusers")

TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 24,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


def bench(*args):
    return main(["bench", *args, "--rounds", "1", "--warmup", "0", "--batch-size", "2"])


def test_a_model_folder_without_weights_runs_random_init(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY_UNET))
    assert bench("--model", f"diffusers:{tmp_path}", "--reducer", "tomesd:ratio=0.5;seed=0") == 0
    out = capsys.readouterr().out
    assert "random-init" in out and "rel. error" in out and "tomesd" in out
    assert "32.0" in out  # the 64-token blocks' self-attention ran on 32


def test_a_pipeline_folder_and_saved_weights(tmp_path, capsys):
    unet = diffusers.UNet2DConditionModel(**{k: v for k, v in TINY_UNET.items() if k != "_class_name"})
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert bench("--model", f"diffusers:{tmp_path}", "--reducer", "tome:r=8") == 0
    assert "local weights" in capsys.readouterr().out


def test_the_shipped_layouts_are_named():
    assert {"sd15-unet", "dit-xl-2-256"} <= set(diffusers_configs())


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"_class_name": "AutoencoderKL"}, "names class 'AutoencoderKL'; allowed: UNet2DConditionModel"),
        (["not", "an", "object"], "holds a JSON list"),
    ],
)
def test_folders_it_cannot_load_are_one_line_errors(tmp_path, capsys, config, words):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert bench("--model", f"diffusers:{tmp_path}") == 2
    assert words in capsys.readouterr().err


def test_unknown_names_list_the_shipped_layouts(capsys):
    assert bench("--model", "diffusers:no-such-model") == 2
    err = capsys.readouterr().err
    assert "sd15-unet" in err and "no-such-model" in err


def test_a_pipeline_without_a_denoiser_is_named(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text("{}")
    assert bench("--model", f"diffusers:{tmp_path}") == 2
    assert "no unet/ or transformer/" in capsys.readouterr().err
