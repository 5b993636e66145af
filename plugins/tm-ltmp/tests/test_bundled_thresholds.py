"""The LTMP thresholds fitted to the bundled Fashion-MNIST ViT (scripts/fit_ltmp_fmnist.py): they
load onto the bundled model and reproduce the eval-mode figures recorded when they were fitted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tmcore
from tmcore import models
from tmcore.bench import top1_and_flop_ratio
from tmcore.demo import bench_args

pytest.importorskip("timm")

FILES = models.reducer_files("fmnist-vit", "ltmp")


def test_the_demo_benchmarks_every_bundled_thresholds_file():
    args = bench_args()
    loaded = [args[i + 1] for i, a in enumerate(args) if a == "--load"]
    assert [f for f in loaded if f in FILES] == FILES  # beside other reducers' bundled files
    assert len(FILES) >= 1 and all(Path(f).is_file() for f in FILES)


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=lambda p: Path(p).stem)
def test_bundled_thresholds_reproduce_their_recorded_accuracy_and_flops(path):
    summary = json.loads(Path(path).with_suffix(".json").read_text())
    model = tmcore.load(models.load("fmnist-vit"), path)
    images, labels = models.load_samples("fmnist-vit")
    top1, ratio = top1_and_flop_ratio(model, models.preprocess(images, model), labels)
    assert top1 == pytest.approx(summary["eval_sample_top1"], abs=1e-3)  # 2 images at most
    assert ratio == pytest.approx(summary["eval_sample_flops_ratio"], abs=2e-3)
    assert abs(summary["flops_ratio_last10pct"] - summary["target"]) < 0.03, "the fit reached its target"
