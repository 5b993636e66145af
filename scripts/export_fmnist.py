"""Export the trained Fashion-MNIST ViT into the package: fp16 weights with the model card's
numbers as metadata, a gzipped sample of 2,000 labelled test images, and the model card.

    python scripts/export_fmnist.py --run build/fmnist --run build/fmnist2

Several ``--run`` folders are training stages in order (each later one started with ``--init``
from the one before); the weights come from the last, the card lists every stage.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save, save_file

from tmcore.datasets import FASHION_MNIST_CLASSES, fashion_mnist
from tmcore.models import FMNIST_ARCH, FMNIST_MEAN, FMNIST_STD, build_fmnist_vit

OUT = Path(__file__).resolve().parent.parent / "tmcore" / "models"


def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(images), 500):
            x = (images[i : i + 500].float() / 255 - FMNIST_MEAN) / FMNIST_STD
            correct += (model(x).argmax(-1) == labels[i : i + 500]).sum().item()
    return correct / len(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", type=Path, action="append", help="a training run folder; repeat for stages in order")
    args = p.parse_args()
    runs = args.run or [Path("build/fmnist")]
    torch.set_num_threads(2)
    stages = [json.loads((run / "log.json").read_text()) for run in runs]
    half = {k: v.half().contiguous() for k, v in load_file(str(runs[-1] / "model.safetensors")).items()}
    model = build_fmnist_vit()
    model.load_state_dict({k: v.float() for k, v in half.items()})  # accuracy of what ships: fp16-rounded
    model.eval()
    test_x, test_y = fashion_mnist("test")
    pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))[:2000].sort().values
    sample_x, sample_y = test_x[pick].contiguous(), test_y[pick].to(torch.uint8).contiguous()
    epochs, offset = [], 0
    for stage, log in enumerate(stages, 1):
        first = len(epochs) + 1
        epochs += [
            {**e, "stage": stage, "epoch": first + i, "seconds": e["seconds"] + offset}
            for i, e in enumerate(log["epochs"])
        ]
        offset += log["epochs"][-1]["seconds"]
    card = {
        "name": "fmnist-vit",
        "arch": FMNIST_ARCH,
        "classes": list(FASHION_MNIST_CLASSES),
        "mean": FMNIST_MEAN,
        "std": FMNIST_STD,
        "recipe": [log["args"] for log in stages],
        "epochs": epochs,
        "training_seconds": round(offset),
        "test_top1": top1(model, test_x, test_y),
        "sample_top1": top1(model, sample_x, sample_y.long()),
        "sample": "2,000 test images, torch.randperm(10000, seed 0)[:2000], sorted",
    }
    save_file(half, str(OUT / "fmnist-vit.safetensors"), metadata={"card": json.dumps(card)})
    (OUT / "fmnist-test-2000.safetensors.gz").write_bytes(
        gzip.compress(save({"images": sample_x, "labels": sample_y}), compresslevel=9, mtime=0)
    )
    (OUT / "fmnist-vit.md").write_text(model_card(card))
    print(json.dumps({k: card[k] for k in ("test_top1", "sample_top1", "training_seconds")}))


def model_card(card: dict) -> str:
    arch = card["arch"]
    done = [sum(e["stage"] == i for e in card["epochs"]) for i in range(1, len(card["recipe"]) + 1)]
    stages = "\n".join(
        f"  {i}. {done[i - 1]} epochs"
        + (f" (stopped early; schedule for {r['epochs']})" if done[i - 1] != int(r["epochs"]) else "")
        + f", AdamW lr {r['lr']} (linear warm-up {r['warmup_steps']} steps, cosine to 0), "
        f"seed {r['seed']}"
        + (", bf16 autocast" if r.get("bf16") == "True" else ", fp32")
        + (f", starting from stage {i - 1}'s weights" if r.get("init") not in (None, "None") else "")
        for i, r in enumerate(card["recipe"], 1)
    )
    r = card["recipe"][0]
    epochs = "\n".join(
        f"| {e['epoch']} | {e['stage']} | {100 * e['test_top1']:.2f}% | {e['seconds'] / 60:.1f} min |"
        for e in card["epochs"]
    )
    return f"""# fmnist-vit

A timm `VisionTransformer` trained from scratch on Fashion-MNIST (MIT licence, Debian package
`dataset-fashion-mnist`), bundled so that `tmcore bench` shows real accuracy with no download.
`tmcore.models.load("fmnist-vit")`.

- Architecture: {arch["depth"]} blocks, width {arch["embed_dim"]}, {arch["num_heads"]} heads, MLP ratio
  {arch["mlp_ratio"]}, 28x28 grey input, patch {arch["patch_size"]}: 196 patches + class token = **197 tokens**
  (the sequence length of ViT-B/16 at 224 px); class-token pooling.
- Weights: fp16 safetensors (`fmnist-vit.safetensors`, loaded as fp32); normalisation mean {card["mean"]},
  std {card["std"]}.
- Recipe (`scripts/train_fmnist_vit.py`): batch {r["batch_size"]}, AdamW, weight decay {r["weight_decay"]} (not on
  norms, biases, tokens, position embedding), label smoothing {r["label_smoothing"]}, gradient clipping 1.0,
  random 2-px shifts and horizontal flips; fp32 weights, {r["threads"]} CPU threads; in stages:
{stages}
- Training time: {card["training_seconds"] / 60:.0f} min on 2 CPU cores.

| epoch | stage | test top-1 (10k, fp32 weights) | elapsed |
|---|---|---|---|
{epochs}

**Accuracy of the shipped fp16 weights: {100 * card["test_top1"]:.2f}% on the 10,000 test images,
{100 * card["sample_top1"]:.2f}% on the bundled sample** (`fmnist-test-2000.safetensors.gz`: {card["sample"]}).

LTMP thresholds learned for this model at reduction targets 0.75 and 0.5:
`fmnist-vit-ltmp75.safetensors` and `fmnist-vit-ltmp50.safetensors`, made by
`scripts/fit_ltmp_fmnist.py` (`make fit-ltmp-fmnist`; figures in `plugins/tm-ltmp/README.md`);
`tmcore.load(model, path)` for a path in `tmcore.models.reducer_files("fmnist-vit", "ltmp")`.
"""


if __name__ == "__main__":
    main()
