"""Model inputs as the benchmark and the test kit pass them: one tensor (images, ``model(x)``) or
keyword tensors (token ids with a right-padded ``attention_mask``, ``model(**inputs)``; a diffusion
model's latents, timesteps and conditioning, where a value may also be a dict of them or
``None``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["Inputs", "call", "batch_size", "device_type", "rows", "moved", "split_samples", "padding_mask"]

Inputs = Tensor | dict[str, Tensor]


def call(model: nn.Module, inputs: Inputs) -> Any:
    """``model(inputs)`` or ``model(**inputs)``."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def batch_size(inputs: Inputs) -> int:
    return (next(iter(inputs.values())) if isinstance(inputs, dict) else inputs).shape[0]


def device_type(inputs: Inputs) -> str:
    """``"cpu"``, ``"cuda"``, ... of the inputs' tensors."""
    return (next(iter(inputs.values())) if isinstance(inputs, dict) else inputs).device.type


def rows(inputs: Inputs, start: int, stop: int) -> Inputs:
    """Samples ``start:stop`` of a batch (tensors sliced, dicts of them too, anything else kept)."""
    if isinstance(inputs, dict):
        return {k: rows(v, start, stop) for k, v in inputs.items()}
    return inputs[start:stop] if isinstance(inputs, Tensor) else inputs


def moved(inputs: Inputs, device: Any) -> Inputs:
    """The inputs on ``device`` (tensors moved, dicts of them too, anything else kept)."""
    if isinstance(inputs, dict):
        return {k: moved(v, device) for k, v in inputs.items()}
    return inputs.to(device) if isinstance(inputs, Tensor) else inputs


def padding_mask(inputs: Inputs) -> Tensor | None:
    """The ``[B, N]`` bool padding mask of text inputs (``None`` for images)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    return None if mask is None else mask.bool()


def split_samples(inputs: Inputs) -> list[Inputs]:
    """One input per sample, its padding cut off: what each sample is on its own."""
    mask = padding_mask(inputs)
    out = []
    for i in range(batch_size(inputs)):
        sample = rows(inputs, i, i + 1)
        if mask is not None and isinstance(sample, dict):
            n = int(mask[i].sum())
            sample = {
                k: v[:, :n] if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[1] == mask.shape[1] else v
                for k, v in sample.items()
            }
        out.append(sample)
    return out
