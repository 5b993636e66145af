"""Learn LTMP thresholds for the bundled Fashion-MNIST ViT (needs tm-ltmp and the Debian package
dataset-fashion-mnist) and save them as a tmcore reducer file.

    python scripts/fit_ltmp_fmnist.py --target 0.5 --fraction 0.5 --out tmcore/models/fmnist-vit-ltmp50.safetensors

Trains the thresholds alone for ``--fraction`` of one epoch of the 60,000 training images, sets
the prune thresholds to 0 if they prune no token of 2,048 other training images (so those blocks
keep fused attention: `snap_inert_prune`), then writes the reducer file and a JSON summary beside
it (steps, time, FLOPs ratio and loss at the start and end, the thresholds, and the eval-mode
top-1 and FLOP ratio on the bundled test sample). ``--snap-only FILE`` applies the snap to a file
fitted before. ``--original`` is the original's recipe (no multiplier, no gradient clip).
``tmcore bench --load FILE`` measures the result against the unreduced model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tm_ltmp
import tmcore
from tmcore import models
from tmcore.bench import top1_and_flop_ratio
from tmcore.datasets import fashion_mnist


def snap_inert_prune(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> bool:
    """Set the prune thresholds to 0 when, at inference, they prune no token of ``images``.

    The fit's prune thresholds drift to a few 1e-6 (the straight-through gradient at ``tau=0.5``
    reaches them from every token alike), about 1000x below the mean importance of a token (1/197).
    Such a threshold prunes nothing, but a threshold above 0 *can* prune, so every block would
    compute the attention matrix for it. Returns whether the thresholds were set to 0.
    """
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            with tmcore.trace(model) as t:
                model(images[i : i + batch_size])
            if (t.source < 0).any():
                return False
        tm_ltmp.thresholds(model)["prune"].zero_()
    return True


def evaluate(model: torch.nn.Module) -> tuple[float, float]:
    """Inference (tokens removed), fp32, on the bundled test sample: ``(top-1, FLOP ratio)``."""
    model.eval()
    test_x, test_y = models.load_samples("fmnist-vit")
    return top1_and_flop_ratio(model, models.preprocess(test_x, model), test_y)


def snap_file(path: Path, seed: int) -> None:
    """`snap_inert_prune` on a saved thresholds file (the 2,048 training images a fit with
    ``seed`` checks), rewriting it and the eval figures of its JSON summary."""
    model = tmcore.load(models.load("fmnist-vit"), path)
    images, _ = fashion_mnist("train")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    fitted = tm_ltmp.thresholds(model)["prune"].tolist()
    snapped = snap_inert_prune(model, models.preprocess(images[order[-2048:]], model))
    summary = json.loads(path.with_suffix(".json").read_text())
    summary["prune_threshold_fitted"] = fitted
    summary["prune_snapped_to_0"] = snapped
    if snapped:
        tmcore.save(model, path)
        summary["eval_sample_top1"], ratio = evaluate(model)
        summary["eval_sample_flops_ratio"] = round(ratio, 4)
    print(json.dumps(summary, indent=2))
    path.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=0.75, help="reduction_target (FLOPs ratio)")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of one epoch of the 60k training images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, nargs="+", default=[5e-6, 5e-3], help="prune lr, merge lr")
    p.add_argument(
        "--regulariser",
        choices=["lagrangian", "penalty"],
        default="lagrangian",
        help="lagrangian (tmcore's default: the FLOPs penalty plus a learned multiplier) or penalty (the original's)",
    )
    p.add_argument("--multiplier-lr", type=float, default=5.0, help="step size of the multiplier (lagrangian)")
    p.add_argument("--clip", type=float, default=1.0, help="per-element gradient clip of the thresholds (0: none)")
    p.add_argument("--original", action="store_true", help="the original's recipe: --regulariser penalty --clip 0")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (quick experiments)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the training forwards (thresholds stay fp32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("build/fmnist-vit-ltmp.safetensors"))
    p.add_argument("--snap-only", type=Path, default=None, help="only snap_inert_prune an existing file")
    args = p.parse_args()
    if args.snap_only is not None:
        torch.set_num_threads(args.threads)
        return snap_file(args.snap_only, args.seed)

    if args.original:
        args.regulariser, args.clip = "penalty", 0.0
    torch.set_num_threads(args.threads)
    model = models.load("fmnist-vit")
    tmcore.apply(model, "ltmp", reduction_target=args.target)
    images, labels = fashion_mnist("train")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    steps = int(len(images) * args.fraction) // args.batch_size
    batches = [order[i * args.batch_size : (i + 1) * args.batch_size] for i in range(steps)]
    loader = [(models.preprocess(images[idx], model), labels[idx]) for idx in batches]

    start = time.time()
    history = tm_ltmp.fit(
        model,
        loader,
        epochs=1,
        lr=args.lr,
        regulariser=args.regulariser,
        multiplier_lr=args.multiplier_lr,
        clip=args.clip or None,
        max_steps=args.max_steps,
        amp_dtype=torch.bfloat16 if args.bf16 else None,
        log_every=10,
    )
    seconds = time.time() - start
    # 2,048 training images the fit did not use (at --fraction < 1) to check the prune thresholds
    snapped = snap_inert_prune(model, models.preprocess(images[order[-2048:]], model))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmcore.save(model, args.out)
    top1, ratio = evaluate(model)
    tail = max(1, len(history.loss) // 10)
    summary = {
        "target": args.target,
        "steps": history.steps,
        "images": history.steps * args.batch_size,
        "fraction_of_epoch": round(history.steps * args.batch_size / len(images), 3),
        "bf16": args.bf16,
        "lr": args.lr,
        "regulariser": args.regulariser,
        "multiplier_lr": args.multiplier_lr if args.regulariser == "lagrangian" else None,
        "clip": args.clip or None,
        "multiplier_last": round(history.multiplier[-1], 4),
        "seconds": round(seconds),
        "flops_ratio_first": round(history.flops_ratio[0], 4),
        "flops_ratio_last10pct": round(sum(history.flops_ratio[-tail:]) / tail, 4),
        "loss_first": round(history.loss[0], 4),
        "loss_last10pct": round(sum(history.loss[-tail:]) / tail, 4),
        "skipped": history.skipped,
        "merge_threshold": [round(v, 4) for v in history.merge_threshold.tolist()],
        "prune_threshold": [round(v, 5) for v in history.prune_threshold.tolist()],
        "prune_threshold_fitted": history.prune_threshold.tolist(),
        "prune_snapped_to_0": snapped,
        "eval_sample_top1": top1,
        "eval_sample_flops_ratio": round(ratio, 4),
    }
    print(json.dumps(summary, indent=2))
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
