"""`fit`: LTMP's short fine-tuning run of the thresholds alone (docs/algorithms.md 4.6)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

import tmcore
from tm_ltmp.loss import flops_ratio, loss_parts
from tm_ltmp.reducer import LTMP
from tmcore import InvalidConfigError
from tmcore.training import StepProgress, TrainOnly, total_steps

__all__ = ["fit", "FitHistory", "thresholds", "get_reducer"]


def get_reducer(model: nn.Module) -> LTMP:
    """The `LTMP` reducer ``tmcore.apply(model, "ltmp", ...)`` installed on ``model``."""
    return tmcore.get_reducer(model, LTMP)


def thresholds(model: nn.Module) -> dict[str, nn.Parameter]:
    """The learned thresholds of an LTMP-patched model: ``{"merge": [L], "prune": [L]}``
    ``nn.Parameter``s, e.g. for your own optimiser (they are not in ``model.parameters()``)."""
    reducer = get_reducer(model)
    return {"merge": reducer.merge_threshold, "prune": reducer.prune_threshold}


@dataclass
class FitHistory:
    """What `fit` did, one entry per optimiser step (skipped batches excluded).

    Attributes:
        loss, cls_loss, flops_ratio: the total loss, its cross-entropy part and the FLOPs ratio
            of each step's forward (before the step).
        lr: ``(prune lr, merge lr)`` used by each step.
        multiplier: the FLOPs constraint's Lagrange multiplier at each step (all 0 with
            ``regulariser="penalty"``).
        skipped: batches skipped because the loss was not finite.
        merge_threshold, prune_threshold: ``[L]`` thresholds after training (CPU copies).
    """

    loss: list[float] = field(default_factory=list)
    cls_loss: list[float] = field(default_factory=list)
    flops_ratio: list[float] = field(default_factory=list)
    lr: list[tuple[float, float]] = field(default_factory=list)
    multiplier: list[float] = field(default_factory=list)
    skipped: int = 0
    merge_threshold: Tensor | None = None
    prune_threshold: Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.loss)


def _lrs(lr: float | Sequence[float]) -> tuple[float, float]:
    values = [float(lr)] if isinstance(lr, (int, float)) else [float(v) for v in lr]
    if len(values) not in (1, 2) or not all(v > 0 and math.isfinite(v) for v in values):
        raise InvalidConfigError(
            f"fit: lr={lr!r}: expected one positive float (both thresholds) or two (prune lr, merge lr)"
        )
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def fit(
    model: nn.Module,
    loader: Iterable[Any],
    reduction_target: float | None = None,
    epochs: int = 1,
    lr: float | Sequence[float] = (5e-6, 5e-3),
    *,
    momentum: float = 0.0,
    reg_scale: float = 10.0,
    cls_scale: float = 1.0,
    label_smoothing: float = 0.1,
    schedule: Literal["epoch", "step"] = "epoch",
    regulariser: Literal["lagrangian", "penalty"] = "lagrangian",
    multiplier_lr: float = 5.0,
    clip: float | None = 1.0,
    max_steps: int | None = None,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    log_every: int = 50,
) -> FitHistory:
    """Train the thresholds of an LTMP-patched model; the backbone stays frozen and unchanged.

    Runs the model in training mode (soft masks), minimising
    ``cls_scale * CE + reg_scale * (flops_ratio - reduction_target)^2 + multiplier * (flops_ratio
    - reduction_target)`` with SGD on the thresholds only, clamping them to ``[0, 1]`` after every
    step (when ``reg_scale > 0``) and skipping batches whose loss is not finite, as the original
    ``train.py`` does. The model's training flag and its parameters' ``requires_grad`` are
    restored afterwards.

    The recipe differs from the original's in two places, so that low targets are reached (the
    original's penalty alone left a fit at target 0.35 at a ratio of 0.74):

    - ``clip``: each threshold's gradient is clipped to ``[-clip, clip]``. The straight-through
      cross-entropy gradient is usually ~0.03 but has rare spikes of 10-60 (a query whose alive
      keys are almost all masked), which throw a threshold to a bound of ``[0, 1]``, where the
      penalty's weak pull in later blocks cannot bring it back.
    - ``regulariser="lagrangian"``: a multiplier integrates the excess FLOPs ratio
      (``multiplier += multiplier_lr * (ratio - target)``, never below 0) once the ratio has come
      within 0.05 of the target, so the pull towards the target grows until it balances the
      cross-entropy instead of settling wherever the fixed penalty does.

    ``regulariser="penalty", clip=None`` is the original's recipe.

    Args:
        model: a model patched with ``tmcore.apply(model, "ltmp", ...)``.
        loader: yields ``(images, targets)``; targets are class indices or probabilities.
        reduction_target: FLOPs ratio to reach, in ``(0, 1]``; default: the config's.
        epochs: passes over ``loader``.
        lr: one value for both thresholds, or ``(prune lr, merge lr)`` (the original's README:
            ``5e-6 5e-3``).
        momentum: SGD momentum; the original's ``--opt momentum`` runs with its ``--momentum``
            default of 0.
        schedule: cosine annealing per ``epoch`` (the original's timm scheduler: constant
            during a 1-epoch run) or per ``step`` (needs ``len(loader)`` or ``max_steps``).
        regulariser: ``lagrangian`` (default) or ``penalty`` (the original's: no multiplier).
        multiplier_lr: the multiplier's step per unit of FLOPs-ratio error.
        clip: per-element gradient clip of the thresholds; ``None``: none (the original's).
        max_steps: stop after this many optimiser steps.
        device: where the batches go; default: the model's parameters' device.
        amp_dtype: run forwards under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).
        progress: show a progress bar (rich on a terminal, else a line every ``log_every`` steps).

    Returns:
        `FitHistory` with the per-step loss, FLOPs ratio and multiplier.

    Raises:
        NotAppliedError: the model carries no LTMP reducer.
        InvalidConfigError: a bad ``reduction_target``, ``epochs``, ``lr``, ``schedule``,
            ``regulariser``, ``multiplier_lr`` or ``clip``.
    """
    reducer = get_reducer(model)
    target = reducer.config.reduction_target if reduction_target is None else float(reduction_target)
    if not 0 < target <= 1:
        raise InvalidConfigError(f"fit: reduction_target={reduction_target!r}: must be in (0, 1]")
    if not isinstance(epochs, int) or epochs < 1:
        raise InvalidConfigError(f"fit: epochs={epochs!r}: must be an int >= 1")
    if schedule not in ("epoch", "step"):
        raise InvalidConfigError(f"fit: schedule={schedule!r}: allowed 'epoch' or 'step'")
    if regulariser not in ("lagrangian", "penalty"):
        raise InvalidConfigError(f"fit: regulariser={regulariser!r}: allowed 'lagrangian' or 'penalty'")
    if not (multiplier_lr >= 0 and math.isfinite(multiplier_lr)):
        raise InvalidConfigError(f"fit: multiplier_lr={multiplier_lr!r}: must be a finite float >= 0")
    if clip is not None and not (clip > 0 and math.isfinite(clip)):
        raise InvalidConfigError(f"fit: clip={clip!r}: must be a finite float > 0, or None (no clipping)")
    prune_lr, merge_lr = _lrs(lr)
    info = tmcore.get_patch(model).runtime.info
    if info.dim <= 0:
        raise InvalidConfigError(
            f"fit: the {info.family!r} adapter does not report the embedding width (ModelInfo.dim)"
        )
    params = list(model.parameters())
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)

    total = total_steps(loader, epochs, max_steps)
    if schedule == "step" and total is None:
        raise InvalidConfigError("fit: schedule='step' needs a loader with len() or max_steps")

    merge_p, prune_p = reducer.merge_threshold, reducer.prune_threshold
    reducer.to(device)  # before the optimiser creates its state
    groups = [{"params": [prune_p], "lr": prune_lr}, {"params": [merge_p], "lr": merge_lr}]
    opt = torch.optim.SGD(groups, momentum=momentum)
    base_lrs = (prune_lr, merge_lr)
    history = FitHistory()
    bar = StepProgress("ltmp fit", total, progress, log_every)
    step = 0
    multiplier, start, reached = 0.0, None, False
    frozen = TrainOnly(model, [merge_p, prune_p])
    try:
        for epoch in range(epochs):
            for batch in loader:
                if max_steps is not None and step >= max_steps:
                    break
                phase = epoch / epochs if schedule == "epoch" else step / total  # type: ignore[operator]
                factor = 0.5 * (1 + math.cos(math.pi * phase))
                for group, base in zip(opt.param_groups, base_lrs):
                    group["lr"] = base * factor
                images, labels = batch[0].to(device), batch[1].to(device)
                autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
                with autocast, tmcore.trace(model) as trace:
                    logits = model(images)
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                if not trace.masks:
                    raise RuntimeError(
                        "the forward ran without soft masks; "
                        "is the model's adapter calling Runtime.enter(training=...)?"
                    )
                ratio = flops_ratio(trace.masks, trace.masks[0].shape[1], info.dim)
                total_loss, ce = loss_parts(
                    logits.float(), labels, ratio, target, reg_scale, cls_scale, label_smoothing
                )
                total_loss = total_loss + multiplier * (ratio - target)
                opt.zero_grad(set_to_none=True)
                value = float(total_loss.detach())  # the original skips NaN losses (one sync per step)
                if not math.isfinite(value):
                    history.skipped += 1
                    continue
                total_loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_value_([merge_p, prune_p], clip)
                opt.step()
                if reg_scale > 0:
                    with torch.no_grad():
                        merge_p.clamp_(0, 1)
                        prune_p.clamp_(0, 1)
                step += 1
                history.multiplier.append(multiplier)
                error = float(ratio.detach()) - target
                reached = reached or abs(error) <= 0.05 or (start is not None and (error > 0) != start)
                start = error > 0 if start is None else start
                if regulariser == "lagrangian" and reached:
                    # dual ascent on ratio <= target: the multiplier integrates the excess FLOPs, so the
                    # pull towards the target grows until it outweighs the cross-entropy's (which
                    # favours keeping tokens); it starts once the ratio has come within 0.05 of the
                    # target (no wind-up on the way there) and never goes negative
                    multiplier = max(0.0, multiplier + multiplier_lr * error)
                history.loss.append(value)
                history.cls_loss.append(float(ce.detach()))
                history.flops_ratio.append(float(ratio.detach()))
                history.lr.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
                bar.update(
                    step,
                    f"loss {value:.4f}  flops {history.flops_ratio[-1]:.3f} -> {target:.3f}  mult {multiplier:.2f}",
                )
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)
        frozen.restore()
    history.merge_threshold = merge_p.detach().cpu().clone()
    history.prune_threshold = prune_p.detach().cpu().clone()
    return history
