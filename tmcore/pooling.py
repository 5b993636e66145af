"""Pooling merged tokens: each token counts as many times as the inputs it stands for."""

from __future__ import annotations

from torch import Tensor

from tmcore.plan import size_dtype, unit_sizes

__all__ = ["weighted_mean", "mean_pool"]


def weighted_mean(x: Tensor, weight: Tensor) -> Tensor:
    """``[B, N, C]`` tokens, ``[B, N, 1]`` weights -> ``[B, C]`` weighted mean over tokens.

    Weights and sums in `tmcore.plan.size_dtype` (float32 for half tokens, which cannot count);
    the mean comes back in ``x``'s dtype."""
    weight = weight.to(size_dtype(x.dtype))
    return ((x * weight).sum(dim=1) / weight.sum(dim=1)).to(x.dtype)


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
    weight = unit_sizes(hidden)
    if attention_mask is not None:
        weight = weight * attention_mask.reshape(weight.shape).to(weight.dtype)
    if sizes is not None:
        weight = weight * sizes.reshape(weight.shape).to(weight.dtype)
    return ((hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-9)).to(hidden.dtype)
