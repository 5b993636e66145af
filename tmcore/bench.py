"""Side-by-side throughput measurement: reduced vs unreduced, same model, same batch, one run.

Variants are timed in interleaved rounds (base, setting 1, setting 2, ..., base, ...) so that
drift on a noisy machine hits all of them alike; each figure is a median over rounds.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

import tmcore

__all__ = ["Setting", "BenchRow", "vit_macs", "compare", "reduction_share"]


@dataclass(frozen=True)
class Setting:
    """One reducer configuration to measure (``reducer=None`` is the unreduced model)."""

    reducer: str | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.reducer is None:
            return "none"
        return f"{self.reducer}(" + ", ".join(f"{k}={v!r}" for k, v in self.config.items()) + ")"


@dataclass
class BenchRow:
    reducer: str
    config: dict[str, Any]
    images_per_s: float
    speedup: float
    gmacs: float
    flop_ratio: float
    token_counts: list[int]
    tokens_out: int
    ms_per_batch: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def vit_macs(token_counts: Sequence[int], dim: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-accumulates of the transformer blocks of a ViT, from traced token counts.

    ``token_counts[l]`` tokens enter block ``l`` (attention runs on them) and
    ``token_counts[l + 1]`` leave it (the MLP runs on those, after the reduction):
    ``4 n C^2`` (qkv + proj) ``+ 2 n^2 C`` (QK^T and AV) ``+ 2 mlp_ratio n' C^2`` (MLP).
    """
    total = 0.0
    for n, n_mid in zip(token_counts[:-1], token_counts[1:]):
        total += 4 * n * dim**2 + 2 * n * n * dim + 2 * mlp_ratio * n_mid * dim**2
    return total


def _counts(model: nn.Module, x: torch.Tensor) -> list[int]:
    with tmcore.trace(model) as t, torch.inference_mode():
        model(x[:1])
    return [int(c) if isinstance(c, int) else int(c.float().mean()) for c in t.token_counts]


def _unreduced_tokens(model: nn.Module) -> int:
    from tmcore.registry import registry

    return registry.find_adapter(model).obj().describe(model).num_tokens


def _block_dims(model: nn.Module) -> tuple[int, float]:
    blk = model.blocks[0]
    dim = blk.norm1.normalized_shape[0]
    hidden = blk.mlp.fc1.out_features
    return dim, hidden / dim


def compare(
    model: nn.Module,
    settings: Sequence[Setting],
    inputs: torch.Tensor,
    *,
    rounds: int = 10,
    warmup: int = 2,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[BenchRow]:
    """Measure the unreduced ``model`` and every setting side by side on ``inputs``.

    Each setting runs on its own deep copy of ``model`` (same weights). Returns one row per
    setting, the unreduced model first.
    """
    variants: list[tuple[Setting, nn.Module]] = [(Setting(None), model)]
    for s in settings:
        m = tmcore.apply(copy.deepcopy(model), s.reducer, **s.config)
        variants.append((s, m))
    device_type = inputs.device.type

    def run(m: nn.Module) -> float:
        with torch.inference_mode(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if device_type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            m(inputs)
            if device_type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

    for _ in range(warmup):
        for _, m in variants:
            run(m)
    times: list[list[float]] = [[] for _ in variants]
    total = rounds * len(variants)
    for i in range(rounds):
        for j, (_, m) in enumerate(variants):
            times[j].append(run(m))
            if progress:
                progress(i * len(variants) + j + 1, total)

    dim, mlp_ratio = _block_dims(model)
    reduced_counts = [_counts(m, inputs) for _, m in variants[1:]]
    n0 = reduced_counts[0][0] if reduced_counts else _unreduced_tokens(model)
    all_counts = [[n0] * (len(model.blocks) + 1), *reduced_counts]
    rows: list[BenchRow] = []
    for (s, m), ts, counts in zip(variants, times, all_counts):
        med = statistics.median(ts)
        macs = vit_macs(counts, dim, mlp_ratio)
        rows.append(
            BenchRow(
                reducer=s.reducer or "none",
                config=dict(s.config),
                images_per_s=inputs.shape[0] / med,
                speedup=0.0,
                gmacs=macs / 1e9,
                flop_ratio=0.0,
                token_counts=counts,
                tokens_out=counts[-1],
                ms_per_batch=med * 1e3,
            )
        )
    base = rows[0]
    for row in rows:
        row.speedup = row.images_per_s / base.images_per_s
        row.flop_ratio = base.gmacs / row.gmacs
    return rows


def reduction_share(model: nn.Module, inputs: torch.Tensor, runs: int = 5) -> float:
    """Median fraction of a patched model's forward time spent in tmcore's score / match /
    reduce step (wall clock around each step; no profiler, whose per-op overhead would inflate
    the many small ops of the step)."""
    runtime = tmcore.get_patch(model).runtime
    step = runtime.step
    sync = torch.cuda.synchronize if inputs.device.type == "cuda" else (lambda: None)
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
            model(inputs)
            for _ in range(runs):
                spent[0] = 0.0
                sync()
                start = time.perf_counter()
                model(inputs)
                sync()
                shares.append(spent[0] / (time.perf_counter() - start))
    finally:
        del runtime.step
    return statistics.median(shares)
