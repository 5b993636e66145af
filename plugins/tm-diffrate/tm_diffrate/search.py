"""`search`: DiffRate's differentiable search of the per-block kept counts (the backbone frozen),
and the FLOP model it is regularised by."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tmcore
from tm_diffrate.ops import ste_min
from tm_diffrate.reducer import DiffRate
from tm_diffrate.schedules import KEEP_ALL, token_counts
from tmcore import InvalidConfigError
from tmcore.bench import flop_model
from tmcore.flops import BlockFlops
from tmcore.training import StepProgress, TrainOnly, total_steps

__all__ = ["search", "SearchHistory", "flops", "get_reducer"]


def get_reducer(model: nn.Module) -> DiffRate:
    """The `DiffRate` reducer ``tmcore.apply(model, "diffrate", ...)`` installed on ``model``."""
    return tmcore.get_reducer(model, DiffRate)


def flops(reducer: DiffRate, block: BlockFlops, num_tokens: int | None = None) -> Tensor:
    """The search's FLOP model: MACs of the blocks for the current logits, differentiable.

    Per block ``l``: attention on the ``N`` tokens entering, then ``N = min_STE(N, prune_l,
    merge_l)`` (gradient to both kept counts, none to ``N``), then the MLP on ``N`` (the official
    ``calculate_flop_training`` with the adapter's `BlockFlops`; patch embedding and head, constant,
    are left out).

    Args:
        reducer: a searching `DiffRate` (``search=True``).
        block: the model's block cost (`tmcore.bench.flop_model`).
        num_tokens: tokens entering block 0; default: the model's.

    Returns:
        A 0-dim float32 tensor of MACs per sample.
    """
    n = torch.tensor(float(num_tokens or reducer.info.num_tokens), device=reducer.prune_logits.device)
    total = n.new_zeros(())
    for layer in range(reducer.info.num_layers):
        prune, merge = reducer.kept(layer)
        after = ste_min(n, prune, merge)
        total = total + block.block(n, after)
        n = after
    return total


@dataclass
class SearchHistory:
    """What `search` did, one entry per optimiser step.

    Attributes:
        loss, ce, gflops: the total loss, its cross-entropy part and the FLOP model's GMACs per
            sample (blocks only) of each step, before the step.
        lr: the learning rate of each step.
        prune, merge: the searched schedule (kept counts per block, prefix included).
        tokens: tokens after each block under it, at the model's input length.
        gflops_searched, gflops_full: the blocks' GMACs per sample with the searched schedule and
            without reduction.
        seconds: wall time of the search loop.
    """

    loss: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    gflops: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    prune: list[int] = field(default_factory=list)
    merge: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    gflops_searched: float = 0.0
    gflops_full: float = 0.0
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.loss)


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidConfigError(f"search: {name}={value!r}: allowed a finite number {bound}")
    return float(value)


def search(
    model: nn.Module,
    data: Iterable[Any],
    target_flops: float,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 0.01,
    min_lr: float = 0.001,
    lam: float = 5.0,
    flops_unit: float = 1e9,
    granularity: int = 4,
    label_smoothing: float = 0.1,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    log_every: int = 10,
) -> SearchHistory:
    """Search DiffRate kept counts for ``model`` (its weights frozen and unchanged), then apply
    the searched schedule to it (``tmcore.apply(model, "diffrate", prune=..., merge=...)``).

    The model runs in training mode with soft masks (`DiffRate`'s search block); the loss is
    ``CE + lam * (F / flops_unit - target_flops)^2`` with ``F`` the blocks' MACs per sample
    (`flops`), minimised by AdamW (no weight decay) on the kept-count logits alone, its learning
    rate following a cosine from ``lr`` to ``min_lr`` over the steps (the official recipe: lr
    0.01 to 0.001, lam 5, GMACs). A model without a searching DiffRate reducer gets one (all
    logits 0: uniform over the candidates, as the official start); one that has one continues
    from its logits. The model's training flag and its parameters' ``requires_grad`` are restored.

    Args:
        model: a model an installed adapter handles, with a class token.
        data: yields ``(inputs, targets)``; targets are class indices or probabilities.
        target_flops: the target, in ``flops_unit`` MACs per sample of the transformer blocks.
        epochs: passes over ``data``.
        max_steps: stop after this many optimiser steps.
        lr, min_lr: the cosine's start and end.
        lam: weight of the FLOPs term.
        flops_unit: MACs per unit of ``target_flops`` (1e9: GMACs, the official unit).
        granularity: spacing of the candidate counts (a fresh search only).
        label_smoothing: of the cross-entropy with class-index targets.
        device: where the batches go; default: the model's parameters' device.
        amp_dtype: autocast dtype for the forwards (e.g. ``torch.bfloat16``); logits stay fp32.
        out: write the searched schedule there with ``tmcore.save`` (``.safetensors``) and a JSON
            card beside it (``.json``: the schedule, the figures of this history).
        progress: a progress bar (rich on a terminal, else a line every ``log_every`` steps).

    Returns:
        `SearchHistory`.

    Raises:
        InvalidConfigError: a bad argument; UnsupportedModelError: a model without class token.
    """
    target = _positive("target_flops", target_flops)
    lam = _positive("lam", lam, allow_zero=True)
    unit = _positive("flops_unit", flops_unit)
    lr, min_lr = _positive("lr", lr), _positive("min_lr", min_lr, allow_zero=True)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise InvalidConfigError(f"search: epochs={epochs!r}: allowed an int >= 1")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise InvalidConfigError(f"search: max_steps={max_steps!r}: allowed an int >= 1 or None")

    patch = tmcore.get_patch(model)
    searching = patch is not None and isinstance(patch.reducer, DiffRate) and patch.reducer.config.search
    if not searching:
        tmcore.apply(
            model,
            "diffrate",
            replace=True,
            schedule=KEEP_ALL,
            search=True,
            prune_granularity=granularity,
            merge_granularity=granularity,
        )
    reducer = get_reducer(model)
    info = reducer.info
    block = flop_model(model)
    params = list(model.parameters())
    device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    arch = reducer.arch_parameters()
    for p in arch:
        p.data = p.data.to(device)
    total = total_steps(data, epochs, max_steps)

    opt = torch.optim.AdamW(arch, lr=lr, weight_decay=0.0)
    history = SearchHistory()
    dense = float(block.macs([info.num_tokens] * (info.num_layers + 1)))
    bar = StepProgress("diffrate search", total, progress, log_every)
    step, start = 0, time.time()
    frozen = TrainOnly(model, arch)
    try:
        for _ in range(epochs):
            for batch in data:
                if max_steps is not None and step >= max_steps:
                    break
                phase = step / max(total - 1, 1) if total else 0.0
                rate = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(phase, 1.0)))
                for group in opt.param_groups:
                    group["lr"] = rate
                inputs, labels = batch[0].to(device), batch[1].to(device)
                autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
                with autocast:
                    logits = model(inputs)
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
                macs = flops(reducer, block)
                loss = ce + lam * (macs / unit - target) ** 2
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                history.loss.append(float(loss.detach()))
                history.ce.append(float(ce.detach()))
                history.gflops.append(float(macs.detach()) / 1e9)
                history.lr.append(rate)
                bar.update(
                    step,
                    f"loss {history.loss[-1]:.4f}  ce {history.ce[-1]:.4f}  "
                    f"flops {float(macs.detach()) / unit:.4f} -> {target:.4f}",
                )
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)
        frozen.restore()
    history.seconds = time.time() - start
    prune, merge = reducer.searched_schedule()
    history.prune, history.merge = list(prune), list(merge)
    history.tokens = token_counts(prune, merge, info.num_tokens)
    history.gflops_searched = float(block.macs([info.num_tokens, *history.tokens])) / 1e9
    history.gflops_full = dense / 1e9
    tmcore.apply(model, "diffrate", replace=True, prune=history.prune, merge=history.merge)
    if out is not None:
        _write(model, Path(out), history, target, unit, lam)
    return history


def _write(model: nn.Module, path: Path, history: SearchHistory, target: float, unit: float, lam: float) -> None:
    """The searched schedule as a tmcore reducer file and a JSON card beside it."""
    tmcore.save(model, path)
    card = {
        "reducer": "diffrate",
        "prune": history.prune,
        "merge": history.merge,
        "tokens_after_each_block": history.tokens,
        "target_flops": target,
        "flops_unit": unit,
        "lam": lam,
        "steps": history.steps,
        "seconds": round(history.seconds),
        "gmacs_blocks_searched": round(history.gflops_searched, 6),
        "gmacs_blocks_full": round(history.gflops_full, 6),
        "flops_ratio": round(history.gflops_searched / history.gflops_full, 4),
        "loss_first": round(history.loss[0], 4) if history.loss else None,
        "loss_last": round(history.loss[-1], 4) if history.loss else None,
    }
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")


def history_dict(history: SearchHistory) -> dict[str, Any]:
    """``history`` as plain JSON-able data."""
    return asdict(history)
