"""Search a DiffRate schedule for the bundled Fashion-MNIST ViT (needs tm-diffrate and the Debian
package dataset-fashion-mnist) and save it as a tmcore reducer file with a JSON card beside it.

    python scripts/search_diffrate_fmnist.py --ratio 0.6 --out tmcore/models/fmnist-vit-diffrate.safetensors

Freezes the model and learns the per-block kept-count logits alone (`tm_diffrate.search`) on
``--steps`` batches of the 60,000 training images (``--flops-unit`` rescales the FLOPs term to this
small model: its blocks cost 0.58 GMACs, so the official GMAC unit would make the term 30x weaker
than on DeiT-S), then writes the searched integer schedule and adds to the card the eval-mode
top-1 and FLOP ratio on the bundled 2,000 test images, with and without the schedule.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tm_diffrate
import tmcore
from tmcore import models
from tmcore.bench import flop_model, top1_and_flop_ratio
from tmcore.datasets import fashion_mnist


def evaluate(model: torch.nn.Module) -> tuple[float, float]:
    """Inference (tokens removed), fp32, on the bundled test sample: ``(top-1, FLOP ratio)``."""
    model.eval()
    test_x, test_y = models.load_samples("fmnist-vit")
    return top1_and_flop_ratio(model, models.preprocess(test_x, model), test_y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.6, help="target FLOP ratio of the blocks to the unreduced model")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="arch lr (official 0.01 over ~3,750 steps)")
    p.add_argument("--min-lr", type=float, default=0.005)
    p.add_argument("--lam", type=float, default=5.0)
    p.add_argument("--flops-unit", type=float, default=1e8, help="MACs per unit of the FLOPs term")
    p.add_argument("--granularity", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("build/fmnist-vit-diffrate.safetensors"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = models.load("fmnist-vit")
    tmcore.apply(model, "diffrate", schedule=tm_diffrate.KEEP_ALL)  # the identity: unreduced top-1
    base_top1, _ = evaluate(model)
    info = tmcore.get_patch(model).runtime.info
    dense = float(flop_model(model).macs([info.num_tokens] * (info.num_layers + 1)))
    target = args.ratio * dense / args.flops_unit

    images, labels = fashion_mnist("train")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    batches = [order[i * args.batch_size : (i + 1) * args.batch_size] for i in range(args.steps)]
    loader = [(models.preprocess(images[idx], model), labels[idx]) for idx in batches]

    start = time.time()
    history = tm_diffrate.search(
        model,
        loader,
        target,
        lr=args.lr,
        min_lr=args.min_lr,
        lam=args.lam,
        flops_unit=args.flops_unit,
        granularity=args.granularity,
        out=args.out,
    )
    seconds = time.time() - start
    top1, ratio = evaluate(model)
    card_path = args.out.with_suffix(".json")
    card = json.loads(card_path.read_text())
    tail = max(1, history.steps // 10)
    card.update(
        {
            "model": "fmnist-vit",
            "target_ratio": args.ratio,
            "images": history.steps * args.batch_size,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "min_lr": args.min_lr,
            "granularity": args.granularity,
            "threads": args.threads,
            "seed": args.seed,
            "seconds_total": round(seconds),
            "ce_first": round(history.ce[0], 4),
            "ce_last10pct": round(sum(history.ce[-tail:]) / tail, 4),
            "flops_ratio_first": round(history.gflops[0] * 1e9 / dense, 4),
            "flops_ratio_last10pct": round(sum(history.gflops[-tail:]) / tail * 1e9 / dense, 4),
            "eval_sample_top1": top1,
            "eval_sample_top1_unreduced": base_top1,
            "eval_sample_flops_ratio": round(ratio, 4),
        }
    )
    print(json.dumps(card, indent=2))
    card_path.write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
