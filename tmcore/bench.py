"""Side-by-side throughput measurement: reduced vs unreduced, same model, same batch, one run.

Variants are timed in interleaved rounds (base, setting 1, setting 2, ..., base, ...) so that
drift on a noisy machine hits all of them alike; each figure is a median over rounds.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

import tmcore
from tmcore.flops import BlockFlops
from tmcore.inputs import Inputs, batch_size, call, device_type, split_samples
from tmcore.inputs import rows as input_rows

__all__ = [
    "Setting",
    "BenchRow",
    "vit_macs",
    "flop_model",
    "sample_counts",
    "top1_and_flop_ratio",
    "variants",
    "shared_copy",
    "compiled",
    "COMPILE_MODES",
    "compile_cache",
    "compare",
    "reduction_share",
    "peak_memory_mb",
    "counted_macs",
    "fidelity",
    "write_csv",
    "plot",
]


@dataclass(frozen=True)
class Setting:
    """One reducer configuration to measure (``reducer=None`` is the unreduced model)."""

    reducer: str | None
    config: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    """A reducer file written by `tmcore.save` (config plus learned state, e.g. LTMP thresholds)."""

    @classmethod
    def from_file(cls, path: str) -> Setting:
        """The setting saved in ``path`` by `tmcore.save`."""
        from tmcore.api import read_saved

        name, config, _ = read_saved(path, tensors=False)
        return cls(name, config, str(path))

    def apply(self, model: nn.Module) -> nn.Module:
        """Patch ``model`` in place with this setting (replacing any reducer): `tmcore.load` for
        a saved file, else `tmcore.apply`."""
        if self.path is not None:
            return tmcore.load(model, self.path)
        return tmcore.apply(model, self.reducer, replace=True, **self.config)

    @property
    def label(self) -> str:
        """``none``, ``tome r=8`` or, for a saved file, ``ltmp fmnist-vit-ltmp75.safetensors``."""
        if self.reducer is None:
            return "none"
        if self.path is not None:
            return f"{self.reducer} {os.path.basename(self.path)}"
        return " ".join([self.reducer, *(f"{k}={v}" for k, v in self.config.items())])


@dataclass
class BenchRow:
    reducer: str
    config: dict[str, Any]
    label: str
    images_per_s: float
    speedup: float
    gmacs: float
    flop_ratio: float
    token_counts: list[float]
    tokens_out: float
    ms_per_batch: float
    peak_mem_mb: float | None = None
    single_images_per_s: float | None = None
    """Throughput on the same images fed one at a time (``compare(..., one_at_a_time=True)``)."""
    top1: float | None = None
    agreement: float | None = None
    cosine: float | None = None
    rel_error: float | None = None
    """Outputs that are no prediction (a diffusion model's noise): ``||y - y0|| / ||y0||`` per
    sample against the unreduced model, averaged."""
    compiled: bool = False
    """Timed under ``torch.compile`` (`compiled`); ``speedup`` is then over the compiled
    unreduced model."""
    compile_s: float | None = None
    """Compiled variants: seconds of the first call, which compiles."""
    graphs: int | None = None
    """Graphs dynamo compiled on that first call (1: no graph break)."""
    recompiles: int | None = None
    """Graphs compiled after it, during the warm-up and timed rounds (0: none)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def vit_macs(token_counts: Sequence[Any], dim: int, mlp_ratio: float = 4.0) -> Any:
    """Multiply-accumulates of a ViT's blocks from traced token counts (`BlockFlops` with the MLP
    ``mlp_ratio`` times wider than ``dim``): ``4 n C^2 + 2 n^2 C + 2 mlp_ratio n' C^2`` per block,
    ``n`` tokens entering it and ``n'`` leaving it. Counts may be ``[B]`` tensors (per sample)."""
    return BlockFlops(dim, int(mlp_ratio * dim)).macs(token_counts)


def flop_model(model: nn.Module) -> BlockFlops:
    """The FLOP model ``model``'s adapter supplies (`tmcore.Adapter.flops`)."""
    from tmcore.registry import registry

    return registry.adapter_for(model).flops(model)


def sample_counts(token_counts: Sequence[int | torch.Tensor], batch: int) -> list[torch.Tensor]:
    """A trace's ``token_counts`` (ints, or ``[B]`` tensors for adaptive reducers) as ``[B]``
    float64 CPU tensors, one per entry, for `vit_macs`."""
    return [torch.full((batch,), float(c)) if isinstance(c, int) else c.detach().double().cpu() for c in token_counts]


def _counts(model: nn.Module, x: Inputs) -> list[torch.Tensor]:
    """Tokens entering each block, then leaving the last, per sample of ``x``: ``L + 1`` x ``[B]``
    (real tokens only, for padded text)."""
    with tmcore.trace(model) as t, torch.inference_mode():
        call(model, x)
    return sample_counts(t.token_counts, batch_size(x))


def top1_and_flop_ratio(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 250
) -> tuple[float, float]:
    """Top-1 of a (reduced) model on preprocessed ``images`` ``[N, ...]`` with ``labels`` ``[N]``,
    and its mean per-image FLOP ratio to the unreduced model (the adapter's FLOP model on traced
    counts)."""
    flops = flop_model(model)
    correct, macs = 0, []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            with tmcore.trace(model) as t:
                out = model(images[i : i + batch_size])
            correct += int((out.argmax(-1) == labels[i : i + batch_size]).sum())
            macs.append(flops.macs(sample_counts(t.token_counts, len(out))))
    n_blocks = len(t.token_counts) - 1
    dense = flops.macs([_unreduced_tokens(model)] * (n_blocks + 1))
    return correct / len(images), float(torch.cat(macs).mean() / dense)


def _mean(count: torch.Tensor) -> float:
    """A mean token count, an exact int where every sample has the same count."""
    value = float(count.double().mean())
    return int(value) if bool((count == count[0]).all()) else round(value, 1)


def counted_macs(model: nn.Module, inputs: Inputs) -> float:
    """Multiply-accumulates of one forward on ``inputs``, per sample, as
    ``torch.utils.flop_counter.FlopCounterMode`` counts them (attention on the math backend, which
    it can count): for models whose adapter has no FLOP model (diffusion models, whose cost is
    mostly convolutions and grows with the conditioning's length)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call(model, inputs)
    return counter.get_total_flops() / 2 / batch_size(inputs)


def _block_counts(model: nn.Module, x: Inputs) -> list[float]:
    """Block scope: the tokens each block's merged sub-layers ran on (`tmcore.Trace.merged_counts`)."""
    with tmcore.trace(model) as t, torch.inference_mode():
        call(model, x)
    return [float(c) for c in t.merged_counts]


def flop_blocks(model: nn.Module) -> Sequence[nn.Module]:
    from tmcore.registry import registry

    return registry.adapter_for(model).blocks(model)


def _unreduced_tokens(model: nn.Module) -> int:
    from tmcore.registry import registry

    return registry.adapter_for(model).describe(model).num_tokens


def variants(model: nn.Module, settings: Sequence[Setting]) -> list[tuple[Setting, nn.Module]]:
    """The unreduced ``model`` and, per setting, a patched deep copy of it (same weights)."""
    out: list[tuple[Setting, nn.Module]] = [(Setting(None), model)]
    for s in settings:
        out.append((s, s.apply(shared_copy(model))))
    return out


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``'s modules that shares its parameters and buffers: patches change
    modules, never weights, so every variant of a 3.4 GB UNet costs no second 3.4 GB."""
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
"""``torch.compile`` modes `compiled` takes (``reduce-overhead``: CUDA graphs on GPU)."""


def compiled(models: Sequence[tuple[Setting, nn.Module]], mode: str = "default") -> list[tuple[Setting, nn.Module]]:
    """Each model of `variants` under ``torch.compile(model, mode=mode)``, the unreduced one
    included, so that `compare` sets compiled against compiled. Compilation happens on the first
    call, which `compare` times apart (``compile_s``) with the graphs it makes."""
    if mode not in COMPILE_MODES:
        raise tmcore.TmcoreError(f"compile mode {mode!r} is not one of: {', '.join(COMPILE_MODES)}")
    return [(s, torch.compile(m, mode=None if mode == "default" else mode)) for s, m in models]


def compile_cache(count: int) -> Any:
    """A context in which dynamo keeps a compiled entry per variant: ``count`` variants share the
    backbone's code, each an entry of the same frames (and one per batch size), where dynamo's
    default allows 8 before it runs the rest uncompiled; past the limit it fails instead."""
    limit = max(torch._dynamo.config.recompile_limit, 4 * count)
    return torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True)


def _graphs() -> int:
    """Graphs dynamo has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compare(
    models: Sequence[tuple[Setting, nn.Module]],
    inputs: Inputs,
    *,
    rounds: int = 10,
    warmup: int = 2,
    autocast_dtype: torch.dtype | None = None,
    one_at_a_time: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[BenchRow]:
    """Measure every model of ``models`` (from `variants`) (the unreduced one first) side by side on ``inputs``.

    With ``one_at_a_time``, every round also feeds the same images one by one (batch size 1, as
    research code with per-image token counts runs), giving ``single_images_per_s``.

    A model from `compiled` is first called once apart, untimed (``compile_s``, ``graphs``);
    graphs compiled after that call are counted (``recompiles``). Token counts and FLOPs come
    from the uncompiled modules (a trace compiles another graph).

    Returns one row per variant; FLOP ratios are against the first, speed-ups against the first
    of the same kind (eager or compiled), so one run can hold both.
    """
    from tmcore.registry import uncompiled

    device = device_type(inputs)
    batch = batch_size(inputs)
    singles = split_samples(inputs)

    def run(m: nn.Module, batches: list[Inputs]) -> float:
        with (
            torch.inference_mode(),
            torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None),
        ):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for x in batches:
                call(m, x)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

    modes = [[inputs], singles] if one_at_a_time else [[inputs]]
    first: list[tuple[float, int] | None] = [None] * len(models)  # (compile seconds, graphs)
    recompiles = [0] * len(models)
    with compile_cache(len(models)):
        for j, (_, m) in enumerate(models):
            if uncompiled(m) is not m:
                before = _graphs()
                first[j] = (run(m, [inputs]), _graphs() - before)

        def timed(j: int, batches: list[Inputs]) -> float:
            before = _graphs()
            seconds = run(models[j][1], batches)
            recompiles[j] += _graphs() - before
            return seconds

        for _ in range(warmup):
            for j in range(len(models)):
                for batches in modes:
                    timed(j, batches)
        times: list[list[list[float]]] = [[[] for _ in models] for _ in modes]
        total = rounds * len(models)
        for i in range(rounds):
            for j in range(len(models)):
                for k, batches in enumerate(modes):
                    times[k][j].append(timed(j, batches))
                if progress:
                    progress(i * len(models) + j + 1, total)

    costs = _costs(models, inputs)
    rows: list[BenchRow] = []
    for j, ((s, m), (macs, counts)) in enumerate(zip(models, costs)):
        med = statistics.median(times[0][j])
        single = batch / statistics.median(times[1][j]) if one_at_a_time else None
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            peak = peak_memory_mb(m, inputs)
        rows.append(
            BenchRow(
                reducer=s.reducer or "none",
                config=dict(s.config),
                label=s.label,
                images_per_s=batch / med,
                speedup=0.0,
                gmacs=macs / 1e9,
                flop_ratio=0.0,
                token_counts=counts,
                tokens_out=counts[-1],
                ms_per_batch=med * 1e3,
                peak_mem_mb=peak,
                single_images_per_s=single,
                compiled=first[j] is not None,
                compile_s=first[j][0] if first[j] else None,
                graphs=first[j][1] if first[j] else None,
                recompiles=recompiles[j] if first[j] else None,
            )
        )
    for row in rows:  # eager over the eager unreduced model, compiled over the compiled one
        base = next(r for r in rows if r.compiled == row.compiled)
        row.speedup = row.images_per_s / base.images_per_s
        row.flop_ratio = rows[0].gmacs / row.gmacs
    return rows


def _costs(models: Sequence[tuple[Setting, nn.Module]], inputs: Inputs) -> list[tuple[float, list[float]]]:
    """Per variant, ``(MACs per sample, token counts)``, from the uncompiled modules (a trace
    compiles another graph): the adapter's FLOP model on traced counts (tokens entering each
    block, then leaving the last, means over the batch), or where it has none (diffusion models),
    MACs counted on one forward (`counted_macs`) and block scope's tokens per block (the
    unreduced model: its first block's)."""
    from tmcore.registry import uncompiled

    model = uncompiled(models[0][1])
    batch = batch_size(inputs)
    flops = flop_model(model)
    if flops is None:
        return [
            (
                counted_macs(uncompiled(m), inputs),
                [float(_unreduced_tokens(model))] if s.reducer is None else _block_counts(uncompiled(m), inputs),
            )
            for s, m in models
        ]
    counts_of = [None if s.reducer is None else _counts(uncompiled(m), inputs) for s, m in models]
    reduced = [c for c in counts_of if c is not None]
    # unreduced: every sample's own (real) token count through every block
    n0 = reduced[0][0] if reduced else torch.full((batch,), float(_unreduced_tokens(model)))
    n_blocks = len(reduced[0]) - 1 if reduced else len(flop_blocks(model))
    all_counts = [[n0] * (n_blocks + 1) if c is None else c for c in counts_of]
    # per-sample counts: MACs are the mean over the batch
    return [(float(flops.macs(per_sample).mean()), [_mean(c) for c in per_sample]) for per_sample in all_counts]


def peak_memory_mb(model: nn.Module, inputs: Inputs) -> float:
    """Peak memory of one inference forward above what was allocated before it, in MiB.

    CUDA: the allocator's peak. CPU: the running sum of the profiler's allocation events.
    """
    with torch.inference_mode():
        if device_type(inputs) == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            call(model, inputs)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        from torch.profiler import ProfilerActivity, profile

        os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # keep the profiler's start/stop lines off the terminal
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call(model, inputs)
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def fidelity(
    models: Sequence[nn.Module],
    data: Inputs,
    labels: torch.Tensor | None = None,
    batch_size: int = 100,
    autocast_dtype: torch.dtype | None = None,
) -> list[dict[str, float]]:
    """Accuracy cost of each model: ``top1`` against ``labels`` when given, else ``agreement``
    (same argmax) and ``cosine`` (mean cosine of outputs) with ``models[0]``, the unreduced one.
    Outputs are what the adapter compares (`tmcore.Adapter.output_tensor`): logits, or for a bare
    text encoder its size-weighted mean-pooled embedding. Outputs that are no prediction (a
    diffusion model's ``[B, C, H, W]`` noise) give ``cosine`` over each whole sample and
    ``rel_error``, ``||y - y0|| / ||y0||``, instead of an agreement."""
    from tmcore.inputs import batch_size as count
    from tmcore.registry import registry

    outputs = []
    device = device_type(data)
    n = count(data)
    with torch.inference_mode(), torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for m in models:
            adapter = registry.adapter_for(m)
            chunks = []
            for i in range(0, n, batch_size):
                x = input_rows(data, i, i + batch_size)
                kwargs = x if isinstance(x, dict) else {}
                chunks.append(adapter.output_tensor(m, call(m, x), kwargs).float())
            outputs.append(torch.cat(chunks))
    if labels is not None:
        return [{"top1": (o.argmax(-1) == labels).float().mean().item()} for o in outputs]
    ref = outputs[0]
    if ref.dim() > 2:
        flat = ref.flatten(1)
        return [
            {
                "cosine": torch.nn.functional.cosine_similarity(o.flatten(1), flat, dim=-1).mean().item(),
                "rel_error": ((o.flatten(1) - flat).norm(dim=-1) / flat.norm(dim=-1)).mean().item(),
            }
            for o in outputs
        ]
    return [
        {
            "agreement": (o.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "cosine": torch.nn.functional.cosine_similarity(o, ref, dim=-1).mean().item(),
        }
        for o in outputs
    ]


_COLUMNS = (
    "reducer",
    "config",
    "label",
    "images_per_s",
    "speedup",
    "gmacs",
    "flop_ratio",
    "tokens_out",
    "peak_mem_mb",
    "top1",
    "agreement",
    "cosine",
    "rel_error",
    "ms_per_batch",
    "single_images_per_s",
)


def write_csv(rows: Sequence[BenchRow], path: str) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_COLUMNS)
        for r in rows:
            d = r.as_dict()
            w.writerow([json_config(d[c]) if c == "config" else d[c] for c in _COLUMNS])


def json_config(config: dict[str, Any]) -> str:
    import json

    return json.dumps(config, default=list)


def plot(rows: Sequence[BenchRow], path: str, title: str = "") -> None:
    """Accuracy (or agreement) against throughput: one line per reducer, the unreduced model as a point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise tmcore.TmcoreError("--plot needs matplotlib: pip install 'tmcore[cli]'") from exc
    metric = "top1" if rows[0].top1 is not None else "agreement"
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    base = rows[0]
    ax.scatter([base.images_per_s], [100 * getattr(base, metric)], color="black", zorder=3, label="unreduced")
    by_reducer: dict[str, list[BenchRow]] = {}
    for r in rows[1:]:
        by_reducer.setdefault(r.reducer + (" compiled" if r.compiled else ""), []).append(r)
    for name, rs in by_reducer.items():
        rs = sorted(rs, key=lambda r: r.images_per_s)
        ax.plot([r.images_per_s for r in rs], [100 * getattr(r, metric) for r in rs], marker="o", label=name)
        for r in rs:
            ax.annotate(
                r.label.removeprefix(name).strip(),
                (r.images_per_s, 100 * getattr(r, metric)),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    ax.set_xlabel("images / s")
    ax.set_ylabel("top-1 (%)" if metric == "top1" else "agreement with unreduced (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reduction_share(model: nn.Module, inputs: Inputs, runs: int = 5) -> float:
    """Median fraction of a patched model's forward time spent in tmcore's score / match /
    reduce step (wall clock around each step; no profiler, whose per-op overhead would inflate
    the many small ops of the step)."""
    runtime = tmcore.get_patch(model).runtime
    step = runtime.step
    sync = torch.cuda.synchronize if device_type(inputs) == "cuda" else (lambda: None)
    spent = [0.0]

    def timed_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        sync()
        start = time.perf_counter()
        out = step(*args, **kwargs)
        sync()
        spent[0] += time.perf_counter() - start
        return out

    shares = []
    runtime.step = timed_step  # type: ignore[method-assign]
    try:
        with torch.inference_mode():
            call(model, inputs)
            for _ in range(runs):
                spent[0] = 0.0
                sync()
                start = time.perf_counter()
                call(model, inputs)
                sync()
                shares.append(spent[0] / (time.perf_counter() - start))
    finally:
        del runtime.step
    return statistics.median(shares)
