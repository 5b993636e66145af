"""The ``tmcore`` command: ``plugins`` and ``bench`` (``eval`` and ``visualize`` come next)."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from typing import Any, Sequence

from tmcore.errors import TmcoreError

__all__ = ["main", "parse_reducer_spec"]


class CliError(TmcoreError):
    """A bad command-line argument."""


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, so ``r=(16,-1),8`` gives ``["r=(16,-1)", "8"]``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_reducer_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``NAME[:KEY=V1,V2,...[;KEY2=...]]`` -> one ``(name, config)`` per combination of values.

    ``tome:r=4,8,12`` is three settings; ``tome:r=(16,-1);prop_attn=False`` is one.
    """
    name, _, rest = spec.partition(":")
    if not name.isidentifier():
        raise CliError(f"--reducer {spec!r}: expected NAME[:KEY=VALUE[,VALUE...][;KEY=...]], e.g. tome:r=8,13")
    settings: list[dict[str, Any]] = [{}]
    for item in filter(None, _split_top(rest, ";")):
        key, eq, values = item.partition("=")
        if not eq or not key.strip().isidentifier() or not values:
            raise CliError(f"--reducer {spec!r}: {item!r} is not KEY=VALUE[,VALUE...]")
        options = [_value(v.strip()) for v in _split_top(values, ",")]
        settings = [{**s, key.strip(): v} for s in settings for v in options]
    return [(name, s) for s in settings]


def _load_model(spec: str, pretrained: bool) -> Any:
    kind, _, name = spec.partition(":")
    if kind != "timm" or not name:
        raise CliError(f"--model {spec!r}: expected timm:NAME, e.g. timm:deit_small_patch16_224")
    try:
        import timm
    except ImportError as exc:
        raise CliError("--model timm:...: timm is not installed (pip install 'tmcore[timm]')") from exc
    if not timm.is_model(name):
        raise CliError(f"--model {spec!r}: timm has no model {name!r} (see timm.list_models())")
    return timm.create_model(name, pretrained=pretrained).eval()


def _cmd_plugins(args: argparse.Namespace) -> int:
    import tmcore

    infos = tmcore.plugins()
    if args.json:
        print(json.dumps([vars(p) for p in infos], indent=2))
        return 0
    if not infos:
        print("no tmcore plugins installed (pip install tm-tome tm-timm)")
    for p in infos:
        line = f"{p.distribution} {p.version}"
        if p.reducers:
            line += f"  reducers: {', '.join(p.reducers)}"
        if p.adapters:
            line += f"  adapters: {', '.join(p.adapters)}"
        if p.error:
            line += f"  FAILED TO LOAD: {p.error}"
        print(line)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import tmcore
    from tmcore.bench import Setting, compare, reduction_share

    if args.threads:
        torch.set_num_threads(args.threads)
    specs = args.reducer or [
        f"{r.name}:" + ";".join(f"{k}={v!r}" for k, v in cfg.items())
        for r in tmcore.reducers()
        for cfg in r.obj.example_configs[:1]
    ]
    settings = [Setting(name, cfg) for spec in specs for name, cfg in parse_reducer_spec(spec)]
    for s in settings:  # fail fast on names and configs, before loading anything heavy
        tmcore.registry.registry.get_reducer(s.reducer)
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = _load_model(args.model, args.pretrained).to(args.device)
    size = model.patch_embed.img_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, *size, generator=gen).to(args.device)

    def progress(done: int, total: int) -> None:
        print(f"\r  measuring {done}/{total}", end="", file=sys.stderr, flush=True)

    rows = compare(model, settings, images, rounds=args.rounds, warmup=args.warmup, autocast_dtype=dtype, progress=progress)
    print(file=sys.stderr)
    weights = "pretrained" if args.pretrained else "random-init"
    print(f"{args.model} ({weights}), batch {args.batch_size}, {args.device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    header = f"{'reducer':<28} {'images/s':>9} {'speed-up':>9} {'GMACs':>7} {'FLOP ratio':>10} {'tokens out':>10}"
    print(header)
    print("-" * len(header))
    for row, setting in zip(rows, [Setting(None), *settings]):
        print(f"{setting.label:<28} {row.images_per_s:>9.1f} {row.speedup:>8.2f}x {row.gmacs:>7.2f} "
              f"{row.flop_ratio:>9.2f}x {row.tokens_out:>10}")
    if args.show_counts:
        for row, setting in zip(rows[1:], settings):
            print(f"tokens entering each block, then out, {setting.label}: {' '.join(map(str, row.token_counts))}")
    if args.reduction_share:
        for setting in settings:
            m = tmcore.apply(model, setting.reducer, replace=True, **setting.config)
            share = reduction_share(m, images)
            print(f"share of forward time in tmcore's score/match/reduce, {setting.label}: {100 * share:.1f}%")
        tmcore.remove(model)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=2)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tmcore", description="Token reduction for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugin distributions and what they register")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_plugins)

    b = sub.add_parser("bench", help="reduced vs unreduced throughput, side by side in one run")
    b.add_argument("--model", default="timm:deit_small_patch16_224", help="timm:NAME (default: %(default)s)")
    b.add_argument("--pretrained", action="store_true", help="load pretrained weights (needs the model hub)")
    b.add_argument("--reducer", action="append", metavar="SPEC",
                   help="NAME[:KEY=V1,V2[;KEY=V]], repeatable; default: every installed reducer")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    b.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds (median)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="autocast dtype")
    b.add_argument("--show-counts", action="store_true", help="print tokens per block for each setting")
    b.add_argument("--reduction-share", action="store_true", help="measure the time share of the reduction step")
    b.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    b.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except TmcoreError as exc:
        print(f"tmcore {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
