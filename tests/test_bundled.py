"""The bundled Fashion-MNIST ViT: its card's accuracy, ImageFolder and torchrun evaluation, and
the visualisation of its merged groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tmcore import models
from tmcore.cli import main

pytest.importorskip("timm")


@pytest.fixture(scope="module")
def model():
    return models.load("fmnist-vit")


def test_architecture_and_card(model):
    card = models.card("fmnist-vit")
    assert len(model.blocks) == 12 and model.patch_embed.num_patches + model.num_prefix_tokens == 197
    assert card["test_top1"] >= 0.85, "the bundled model must reach 85% top-1 on the 10k test images"
    images, labels = models.load_samples("fmnist-vit")
    assert images.shape == (2000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (2000,) and set(labels.tolist()) == set(range(10))


def test_eval_of_the_bundled_model_gives_the_card_accuracy(tmp_path, capsys):
    assert main(["eval", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["total"] == 2000
    assert result["top1"] == models.card("fmnist-vit")["sample_top1"]
    assert "top-1" in capsys.readouterr().out


def test_unknown_bundled_model():
    with pytest.raises(models.UnknownModelError, match="bundled models: fmnist-vit"):
        models.load("mnist-vit")


def _image_folder(root: Path, n: int) -> None:
    from PIL import Image

    images, labels = models.load_samples("fmnist-vit")
    for i in range(n):
        folder = root / f"{int(labels[i])}_{models.card('fmnist-vit')['classes'][int(labels[i])].replace('/', '-')}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0].numpy(), mode="L").save(folder / f"{i:04d}.png")


def test_image_folder_eval_matches_the_tensors(tmp_path, model):
    _image_folder(tmp_path, 60)
    from tmcore.evaluate import image_folder, top1

    folder = top1(model, image_folder(tmp_path, model), batch_size=16)
    images, labels = models.load_samples("fmnist-vit")
    with torch.no_grad():
        direct = (model(models.preprocess(images[:60], model)).argmax(-1) == labels[:60]).sum().item()
    assert folder["total"] == 60 and folder["correct"] == direct


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    _image_folder(tmp_path / "data", 45)  # odd per-rank split: 23 + 22
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [str(tmp_path / "data"), "--reducer", "tome:r=8", "--batch-size", "8"]

    def run(prefix: list[str], out: str) -> dict:
        cmd = [*prefix, "eval", "--data", *base, "--json", str(tmp_path / out)]
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
        return json.loads((tmp_path / out).read_text())

    one = run([sys.executable, "-m", "tmcore.cli"], "one.json")
    two = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tmcore.cli"],
        "two.json",
    )
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert (two["correct"], two["total"]) == (one["correct"], one["total"]) and one["total"] == 45


@pytest.mark.parametrize("r", [8, 13])
def test_visualize_paints_one_colour_per_output_token(tmp_path, r):
    from PIL import Image

    _image_folder(tmp_path / "data", 1)
    image = next((tmp_path / "data").rglob("*.png"))
    out = tmp_path / "groups.png"
    assert main(["visualize", str(image), "--reducer", f"tome:r={r}", "--out", str(out)]) == 0
    png = Image.open(out)
    assert png.size == (14 * 32, 14 * 32)
    colours = {c for _, c in png.getcolors(maxcolors=1 << 16)}
    tokens_out = 197 - 12 * r
    assert len(colours) == tokens_out - 1  # every output token but the class token covers patches


def test_visualize_mean_style_paints_the_input(tmp_path):
    from PIL import Image

    _image_folder(tmp_path / "data", 1)
    image = next((tmp_path / "data").rglob("*.png"))
    out = tmp_path / "groups.png"
    assert main(["visualize", str(image), "--reducer", "tome:r=12", "--style", "mean", "--out", str(out)]) == 0
    png = Image.open(out).convert("L")
    assert png.size == (14 * 32, 14 * 32)
    # an all-black Fashion-MNIST border stays black inside its groups; the garment does not
    assert png.getpixel((16, 16)) < 40 < png.getextrema()[1]
