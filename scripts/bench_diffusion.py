"""tm-tomesd against the original tomesd package, side by side in one run: the unreduced UNet,
tmcore's tomesd at each ratio, and ``tomesd.apply_patch`` at the same ratios, on the same weights
and latents, timed in interleaved rounds by `tmcore.bench.compare` (MACs counted with
FlopCounterMode, fidelity as the noise prediction's cosine and relative error to the unreduced
model). ``tmcore bench --model diffusers:...`` measures tmcore's side alone.

    python scripts/bench_diffusion.py --model diffusers:sd15-unet --ratios 0.3 0.5 --batch-size 2
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from tmcore.bench import Setting, compare, fidelity, shared_copy, variants
from tmcore.cli import _print_table, load_model
from tmcore.registry import registry


@dataclass(frozen=True)
class Peer(Setting):
    """The tomesd package at ``ratio`` (a variant `compare` times like any other)."""

    ratio: float = 0.5

    @property
    def label(self) -> str:
        return f"tomesd 0.1.3 package ratio={self.ratio}"


def _positional_sample(module, args, kwargs):
    """tomesd's pre-hook reads the latent from the first positional argument."""
    if "sample" in kwargs:
        return (kwargs.pop("sample"), *args), kwargs
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="diffusers:sd15-unet")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="global RNG seed before the first call (tomesd's rule)")
    args = parser.parse_args()
    import tomesd

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_model(args.model)
    adapter = registry.adapter_for(model)
    inputs = adapter.example_inputs(model, args.batch_size, seed=0)
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    timed = variants(model, [Setting("tomesd", {"ratio": r}) for r in args.ratios])
    for ratio in args.ratios:
        peer = shared_copy(model)
        peer.register_forward_pre_hook(_positional_sample, with_kwargs=True, prepend=True)
        tomesd.apply_patch(peer, ratio=ratio)
        timed.append((Peer(None, ratio=ratio), peer))
    rows = compare(timed, inputs, rounds=args.rounds, warmup=1)
    for row, fid in zip(rows, fidelity([m for _, m in timed], inputs), strict=True):
        row.cosine, row.rel_error = fid["cosine"], fid["rel_error"]
    title = (
        f"{args.model} ({getattr(model, 'tmcore_weights', '')}), batch {args.batch_size}, "
        f"{args.threads} threads, fp32, median of {args.rounds} interleaved rounds"
    )
    _print_table(
        title,
        ["variant", "images/s", "speed-up", "GMACs", "FLOP ratio", "peak MiB", "cosine", "rel. error"],
        [
            [
                r.label,
                f"{r.images_per_s:.3f}",
                f"{r.speedup:.2f}x",
                f"{r.gmacs:.1f}",
                f"{r.flop_ratio:.2f}x",
                f"{r.peak_mem_mb:.0f}",
                f"{r.cosine:.5f}",
                f"{r.rel_error:.4f}",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
