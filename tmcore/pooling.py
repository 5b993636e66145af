"""Pooling merged tokens: each token counts as many times as the inputs it stands for."""

from __future__ import annotations

from torch import Tensor

__all__ = ["weighted_mean", "mean_pool"]


def weighted_mean(x: Tensor, weight: Tensor) -> Tensor:
    """``[B, N, C]`` tokens, ``[B, N, 1]`` weights -> ``[B, C]`` weighted mean over tokens."""
    weight = weight.to(x.dtype)
    return (x * weight).sum(dim=1) / weight.sum(dim=1)


def mean_pool(hidden: Tensor, attention_mask: Tensor | None = None, sizes: Tensor | None = None) -> Tensor:
    """Sentence-transformers mean pooling that knows merged tokens.

    Args:
        hidden: ``[B, N, C]`` last hidden state (reduced or not).
        attention_mask: ``[B, N]`` 1 on real tokens, 0 on padding (``None``: all real).
        sizes: ``[B, N]`` or ``[B, N, 1]`` tokens each output token stands for (``None``: 1).

    Returns:
        ``[B, C]``: ``sum(x * mask * size) / sum(mask * size)``; with sizes this equals the mean
        pool of the unreduced model whenever merged tokens are the means of their groups.
    """
    weight = hidden.new_ones(hidden.shape[0], hidden.shape[1], 1)
    if attention_mask is not None:
        weight = weight * attention_mask.reshape(weight.shape).to(hidden.dtype)
    if sizes is not None:
        weight = weight * sizes.reshape(weight.shape).to(hidden.dtype)
    return (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-9)
