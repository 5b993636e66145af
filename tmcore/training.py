"""What a plugin's optimisation loop over a reducer's learned state needs (LTMP's threshold fit,
DiffRate's rate search): `TrainOnly`, the model in training mode with gradients for those
parameters only, and `StepProgress` on stderr."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from torch import nn

__all__ = ["StepProgress", "TrainOnly", "total_steps"]


def total_steps(data: Iterable[object], epochs: int, max_steps: int | None = None) -> int | None:
    """Optimisation steps of ``epochs`` passes over ``data`` (``len(data)`` batches each), at most
    ``max_steps``; ``None`` when ``data`` has no length and no ``max_steps`` bounds it."""
    try:
        per_epoch: int | None = len(data)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    total = per_epoch * epochs if per_epoch is not None else None
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    return total


class TrainOnly:
    """Puts ``model`` in training mode with gradients for ``params`` only (the model's weights
    frozen); `restore` gives every parameter its ``requires_grad`` and the model its mode back.

    Args:
        model: the patched model.
        params: the parameters to train (a reducer's, which need not be the model's).
    """

    def __init__(self, model: nn.Module, params: Iterable[nn.Parameter]) -> None:
        self.model, self.was_training = model, model.training
        trained = list(params)
        self.flags = [(p, p.requires_grad) for p in [*model.parameters(), *trained]]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        model.train()

    def restore(self) -> None:
        for p, flag in reversed(self.flags):  # a trained parameter of the model's own: its first flag last
            p.requires_grad_(flag)
        self.model.train(self.was_training)


class StepProgress:
    """A rich progress bar on stderr when rich is installed and stderr is a terminal, else a
    plain line every ``every`` steps (logs of long runs show progress as it happens).

    Args:
        label: what runs, e.g. ``"ltmp fit"``.
        total: the number of steps, ``None`` when unknown.
        enabled: ``False``: show nothing.
        every: steps between two plain lines.
    """

    def __init__(self, label: str, total: int | None, enabled: bool = True, every: int = 10) -> None:
        self.label, self.total, self.enabled, self.every = label, total, enabled, max(every, 1)
        self.bar = None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        except ImportError:
            return
        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self.bar = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=console,
        )
        self.bar.start()
        self.task = self.bar.add_task("", total=total)

    def update(self, step: int, text: str) -> None:
        """Step ``step`` is done; ``text`` says how it went (loss, FLOPs...)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=text)
        elif step % self.every == 0 or step == self.total:
            of = f"/{self.total}" if self.total else ""
            print(f"{self.label} step {step}{of}: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
