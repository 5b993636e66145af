"""The ``tmcore`` command: ``bench``, ``eval``, ``visualize`` and ``plugins``."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tmcore.errors import TmcoreError

__all__ = ["main", "parse_reducer_spec", "load_model"]

DEFAULT_MODEL = "fmnist-vit"


class CliError(TmcoreError):
    """A bad command-line argument."""


# -- arguments ---------------------------------------------------------------------------------
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
    """A Python literal, ``inf`` / ``-inf`` / ``nan`` (no literal spells them), or else the text."""
    if text.strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
        return float(text)
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


def _settings(specs: Sequence[str] | None, files: Sequence[str] = ()) -> list[Any]:
    """Reducer settings from ``--reducer`` and ``--load`` (default: every installed reducer's
    example configs), validated against the registry before anything heavy is loaded."""
    import tmcore
    from tmcore.bench import Setting
    from tmcore.reducer import validate_config
    from tmcore.registry import registry

    for path in files:
        if not Path(path).is_file():
            raise CliError(f"--load {path!r}: no such file (expected a reducer file written by tmcore.save)")
    loaded = [Setting.from_file(path) for path in files]
    if specs:
        settings = [Setting(name, cfg) for spec in specs for name, cfg in parse_reducer_spec(spec)]
    elif loaded:
        settings = []
    else:
        settings = [Setting(r.name, dict(c)) for r in tmcore.reducers() for c in r.obj.example_configs]
    settings += loaded
    for s in settings:
        validate_config(registry.get_reducer(s.reducer).obj, s.config)
    return settings


def load_model(spec: str, pretrained: bool = False, checkpoint: str | None = None) -> Any:
    """A bundled model name, ``timm:NAME`` (``--checkpoint`` for local weights), or a local
    transformers directory."""
    import torch

    from tmcore import models

    if spec in models.available():
        return models.load(spec)
    kind, sep, name = spec.partition(":")
    if sep and kind == "timm" and name:
        try:
            import timm
        except ImportError as exc:
            raise CliError("--model timm:...: timm is not installed (pip install 'tmcore[timm]')") from exc
        if not timm.is_model(name):
            raise CliError(f"--model {spec!r}: timm has no model {name!r} (see timm.list_models())")
        kwargs = {"pretrained_cfg_overlay": {"file": checkpoint}} if checkpoint else {}
        with torch.random.fork_rng():
            torch.manual_seed(0)  # random-init weights: the same model in every run
            return timm.create_model(name, pretrained=pretrained or bool(checkpoint), **kwargs).eval()
    path = Path(name if sep and kind == "hf" else spec)
    if path.is_dir() and (path / "config.json").exists():
        return _load_hf(path)
    if sep and kind == "hf":
        raise CliError(f"--model {spec!r}: {name!r} is not a directory with a config.json (save_pretrained output)")
    raise CliError(
        f"--model {spec!r}: expected a bundled model ({', '.join(models.available())}), timm:NAME, "
        f"or hf:PATH (a local transformers model directory)"
    )


def _load_hf(path: Path) -> Any:
    """The model class named by the directory's config (``architectures``: the task head it was
    saved with), else the bare ``AutoModel``; local files only."""
    try:
        import transformers
    except ImportError as exc:
        raise CliError(f"--model {path}: a transformers directory needs transformers installed") from exc
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModel
    return cls.from_pretrained(str(path), local_files_only=True).eval()


def _read_texts(path: str | None) -> list[str]:
    """Sentences, one per line, from ``--texts`` or the bundled sample."""
    if path is None:
        from importlib import resources

        text = resources.files("tmcore.models").joinpath("sentences.txt").read_text(encoding="utf-8")
    else:
        if not Path(path).is_file():
            raise CliError(f"--texts {path!r}: no such file (expected sentences, one per line)")
        text = Path(path).read_text(encoding="utf-8")
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise CliError(f"--texts {path!r}: no sentences in the file")
    return texts


def _tokenize(spec: str, texts: list[str], device: str) -> dict[str, Any]:
    """Token ids and a right-padded attention mask for ``texts``, with the model directory's tokenizer."""
    from transformers import AutoTokenizer

    path = spec.partition(":")[2] if spec.startswith("hf:") else spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CliError(f"--model {spec!r}: a text model needs its tokenizer in the directory ({exc})") from None
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def _inputs(args: argparse.Namespace, model: Any) -> tuple[Any, Any, Any]:
    """``(timed batch, all data for fidelity, labels or None)`` for ``--model``: the bundled
    images, sentences for text models (``--texts``), else random inputs of the model's shape."""
    from tmcore import models
    from tmcore.registry import registry

    if args.model in models.available():
        images, labels = models.load_samples(args.model)
        data = models.preprocess(images, model).to(args.device)
        return data[: args.batch_size], data, labels.to(args.device)
    adapter = registry.adapter_for(model)
    if adapter.describe(model).modality == "text":
        texts = _read_texts(getattr(args, "texts", None))
        batch = [texts[i % len(texts)] for i in range(args.batch_size)]
        return _tokenize(args.model, batch, args.device), _tokenize(args.model, texts, args.device), None
    inputs = {k: v.to(args.device) for k, v in adapter.example_inputs(model, args.batch_size, seed=0).items()}
    return inputs, inputs, None


def _progress(label: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A progress bar (rich when installed) as ``(update(done, total), close())``."""
    try:
        from rich.progress import Progress
    except ImportError:

        def update(done: int, total: int) -> None:
            print(f"\r{label} {done}/{total}", end="", file=sys.stderr, flush=True)

        return update, lambda: print(file=sys.stderr)
    bar = Progress(transient=True)
    bar.start()
    task = bar.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return update, bar.stop


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        for r in rows:
            print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
        return
    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=max(160, Console().width)).print(table)


# -- commands ----------------------------------------------------------------------------------
def _cmd_plugins(args: argparse.Namespace) -> int:
    import tmcore

    infos = tmcore.plugins()
    if args.json:
        print(json.dumps([vars(p) for p in infos], indent=2))
        return 0
    if not infos:
        print("no tmcore plugins installed (pip install tm-tome 'tmcore[timm]')")
        return 0
    rows = [
        [p.distribution, p.version, ", ".join(p.reducers) or "-", ", ".join(p.adapters) or "-", p.error or "ok"]
        for p in infos
    ]
    _print_table("installed tmcore plugins", ["distribution", "version", "reducers", "adapters", "status"], rows)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import tmcore
    from tmcore import models
    from tmcore.bench import compare, fidelity, plot, reduction_share, variants, write_csv
    from tmcore.registry import registry

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = _settings(args.reducer, args.load or ())
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = load_model(args.model, args.pretrained, args.checkpoint).to(args.device)
    registry.find_adapter(model)  # no adapter: a clear error before any input is built
    inputs, data, labels = _inputs(args, model)
    patched = variants(model, settings)
    update, close = _progress("measuring")
    rows = compare(
        patched,
        inputs,
        rounds=args.rounds,
        warmup=args.warmup,
        autocast_dtype=dtype,
        one_at_a_time=args.one_at_a_time,
        progress=update,
    )
    close()
    for row, fid in zip(rows, fidelity([m for _, m in patched], data, labels, autocast_dtype=dtype)):
        for key, value in fid.items():
            setattr(row, key, value)

    if args.model in models.available():
        weights = "bundled"
    elif not args.model.startswith("timm:"):
        weights = "local weights"
    else:
        weights = "pretrained" if args.pretrained or args.checkpoint else "random-init"
    title = (
        f"{args.model} ({weights}), batch {args.batch_size}, {args.device}, {args.dtype}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    )
    # agreement of argmax is a prediction metric: only for models with a head
    head = labels is None and _has_head(model, inputs)
    fid_cols = ["top-1"] if labels is not None else (["agreement", "cosine"] if head else ["cosine"])
    unit = "sentences/s" if isinstance(inputs, dict) and "input_ids" in inputs else "images/s"
    table = []
    for row in rows:
        fid_vals = (
            [f"{100 * row.top1:.2f}%"]
            if labels is not None
            else ([f"{100 * row.agreement:.1f}%"] if head else []) + [f"{row.cosine:.4f}"]
        )
        single = (
            [f"{row.single_images_per_s:.1f}", f"{row.images_per_s / row.single_images_per_s:.2f}x"]
            if args.one_at_a_time
            else []
        )
        table.append(
            [
                row.label,
                f"{row.images_per_s:.1f}",
                f"{row.speedup:.2f}x",
                f"{row.gmacs:.2f}",
                f"{row.flop_ratio:.2f}x",
                str(row.tokens_out),
                f"{row.peak_mem_mb:.0f}",
                *fid_vals,
                *single,
            ]
        )
    single_cols = [f"{unit} 1-by-1", "batch gain"] if args.one_at_a_time else []
    _print_table(
        title,
        ["reducer", unit, "speed-up", "GMACs", "FLOP ratio", "tokens out", "peak MiB", *fid_cols, *single_cols],
        table,
    )
    if args.show_counts:
        for row in rows[1:]:
            print(f"tokens per block, {row.label}: {' '.join(map(str, row.token_counts))}")
    if args.reduction_share:
        for s in settings:
            share = reduction_share(s.apply(model), inputs)
            print(f"share of forward time in tmcore's score/match/reduce, {s.label}: {100 * share:.1f}%")
        tmcore.remove(model)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in rows], indent=2, default=list))
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(rows, args.plot, title)
        print(f"plot written to {args.plot}")
    return 0


def _one_setting(spec: str | None) -> Any:
    """The one validated `Setting` of ``--reducer SPEC`` (``None`` without one)."""
    if spec is None:
        return None
    settings = _settings([spec])
    if len(settings) != 1:
        raise CliError(f"--reducer {spec!r}: give one setting here (one value per key)")
    return settings[0]


def _cmd_eval(args: argparse.Namespace) -> int:
    from tmcore import models
    from tmcore.evaluate import bundled_dataset, image_folder, init_distributed, top1

    setting = _one_setting(args.reducer)
    rank, world, device = init_distributed(args.device)
    model = load_model(args.model, args.pretrained, args.checkpoint).to(device)
    if _modality(model) == "text":
        return _eval_text(args, model, setting, device)
    if setting:
        setting.apply(model)
    if args.data:
        data = image_folder(args.data, model)
    elif args.model in models.available():
        data = bundled_dataset(model, args.model)
    else:
        raise CliError(f"--data is required for {args.model!r} (only bundled models carry labelled images)")
    update, close = _progress("evaluating") if rank == 0 else (None, lambda: None)
    result = top1(model, data, batch_size=args.batch_size, device=device, workers=args.workers, progress=update)
    close()
    if rank == 0:
        what = f"{setting.reducer} {setting.config}" if setting else "unreduced"
        print(
            f"{args.model} ({what}): top-1 {100 * result['top1']:.2f}% ({result['correct']}/{result['total']}), "
            f"{world} process{'es' if world > 1 else ''}"
        )
        if args.json:
            reducer = [setting.reducer, setting.config] if setting else None
            summary = {**result, "model": args.model, "reducer": reducer, "world_size": world}
            Path(args.json).write_text(json.dumps(summary))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _modality(model: Any) -> str:
    from tmcore.registry import registry

    return registry.adapter_for(model).describe(model).modality


def _eval_text(args: argparse.Namespace, model: Any, setting: Any, device: str) -> int:
    """A text model has no labelled set here: how close the reduced model stays to the
    unreduced one on ``--texts`` (mean cosine of pooled embeddings, agreement of predictions
    where the model has a head) and how many tokens it keeps."""
    import copy

    import torch

    import tmcore
    from tmcore.bench import fidelity

    if setting is None:
        raise CliError("eval of a text model compares a reduced model with the unreduced one: pass --reducer SPEC")
    texts = _read_texts(args.texts)
    data = _tokenize(args.model, texts, device)
    reduced = setting.apply(copy.deepcopy(model))
    fid = fidelity([model, reduced], data, batch_size=args.batch_size)[1]
    with torch.inference_mode(), tmcore.trace(reduced) as t:
        reduced(**data)
    tokens_in = float(data["attention_mask"].sum(1).double().mean())
    tokens_out = float(torch.as_tensor(t.token_counts[-1]).double().mean())
    head = _has_head(model, data)
    agreement = f", agreement {100 * fid['agreement']:.1f}%" if head else ""
    print(
        f"{args.model} ({setting.reducer} {setting.config}) on {len(texts)} sentences: cosine to unreduced "
        f"{fid['cosine']:.4f}{agreement}, tokens {tokens_in:.1f} -> {tokens_out:.1f}"
    )
    if args.json:
        summary = {
            "model": args.model,
            "reducer": [setting.reducer, setting.config],
            "sentences": len(texts),
            "cosine": fid["cosine"],
            "agreement": fid["agreement"] if head else None,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
        }
        Path(args.json).write_text(json.dumps(summary))
    return 0


def _has_head(model: Any, data: Any) -> bool:
    """Whether the model predicts (its output is or has logits) rather than only embedding."""
    import torch

    from tmcore.inputs import call, rows

    with torch.inference_mode():
        out = call(model, rows(data, 0, 1))
    return not isinstance(out, dict) or "logits" in out


def _cmd_visualize(args: argparse.Namespace) -> int:
    import torch

    import tmcore
    from tmcore.evaluate import image_transform
    from tmcore.visualize import group_map, render_groups

    path = Path(args.image)
    if not path.is_file():
        raise CliError(f"IMAGE {args.image!r}: no such file")
    setting = _one_setting(args.reducer)
    model = load_model(args.model, args.pretrained, args.checkpoint).to(args.device)
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise CliError(f"IMAGE {args.image!r}: not a readable image ({exc})") from None
    setting.apply(model)
    transform = image_transform(model)
    x = transform(image).unsqueeze(0).to(args.device)
    with torch.inference_mode(), tmcore.trace(model) as t:
        model(x)
    p = tmcore.get_patch(model).runtime.info.num_protected
    groups = group_map(t.source[0].cpu(), p, model.patch_embed.grid_size)
    scale = args.scale or max(1, 448 // max(model.patch_embed.grid_size))
    pixels = transform.crop(image.convert("RGB")) if args.style == "mean" else None
    render_groups(groups, scale, pixels).save(args.out)
    n_groups = int(groups.max()) + 1
    tokens_out = int(torch.as_tensor(t.token_counts[-1]).max())  # one image: ragged counts are [1]
    print(f"{args.out}: {n_groups} groups over {groups.numel()} patches ({tokens_out} tokens out incl. {p} protected)")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="bundled model name, timm:NAME, or hf:PATH, a local transformers directory (default: %(default)s)",
    )
    p.add_argument("--pretrained", action="store_true", help="timm: download pretrained weights (needs the hub)")
    p.add_argument("--checkpoint", metavar="PATH", help="timm: load weights from a local file")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--texts",
        metavar="FILE",
        help="text models: sentences, one per line (default: a bundled sample of 64 sentences)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tmcore", description="Token reduction for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="installed plugin distributions, what each registers, load errors")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_plugins)

    b = sub.add_parser("bench", help="reduced vs unreduced: throughput, FLOPs, tokens, memory, accuracy, side by side")
    _add_model_args(b)
    b.add_argument(
        "--reducer",
        action="append",
        metavar="SPEC",
        help="NAME[:KEY=V1,V2[;KEY=V]] (repeatable); default: every installed reducer's example settings",
    )
    b.add_argument(
        "--load",
        action="append",
        metavar="FILE",
        help="a reducer file written by tmcore.save (config + learned state, e.g. LTMP thresholds); repeatable",
    )
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="autocast dtype")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    b.add_argument("--rounds", type=int, default=10, help="timed interleaved rounds (median)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="also time the same images fed one by one (batch size 1) and report the batching gain",
    )
    b.add_argument("--show-counts", action="store_true", help="print tokens per block for each setting")
    b.add_argument("--reduction-share", action="store_true", help="time share of the score/match/reduce step")
    b.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    b.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    b.add_argument("--plot", metavar="PNG", help="accuracy (or agreement) against throughput")
    b.set_defaults(func=_cmd_bench)

    e = sub.add_parser(
        "eval",
        help="top-1 on a labelled image folder or the bundled images (torchrun-aware); for a text model, "
        "cosine and agreement with the unreduced model on --texts",
    )
    _add_model_args(e)
    e.add_argument("--data", metavar="DIR", help="ImageFolder root (DIR/<class>/<image>); default: bundled images")
    e.add_argument("--reducer", metavar="SPEC", help="apply one reducer setting, e.g. tome:r=13")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    e.add_argument("--json", metavar="PATH", help="write the result as JSON (rank 0)")
    e.set_defaults(func=_cmd_eval)

    v = sub.add_parser("visualize", help="PNG of the merged groups over the input: one colour per output token")
    v.add_argument("image", metavar="IMAGE")
    _add_model_args(v)
    v.add_argument("--reducer", default="tome:r=13", metavar="SPEC", help="one setting (default: %(default)s)")
    v.add_argument("--out", default="groups.png", help="output PNG (default: %(default)s)")
    v.add_argument("--scale", type=int, default=0, help="pixels per patch (default: about 448 px wide)")
    v.add_argument(
        "--style",
        default="flat",
        choices=["flat", "mean"],
        help="flat: one distinct colour per group; mean: each group in its mean input colour, "
        "outlined (the ToMe paper's figures) (default: %(default)s)",
    )
    v.set_defaults(func=_cmd_visualize)
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
