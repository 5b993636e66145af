"""LTMP's training objective (docs/algorithms.md 4.6): cross-entropy plus a FLOPs-target penalty."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["flops_ratio", "flops_penalty", "loss", "loss_parts"]


def flops_ratio(masks: Tensor | Sequence[Tensor], num_tokens: int, dim: int) -> Tensor:
    """Relative FLOPs of the masked model, the differentiable proxy LTMP regularises (4.6).

    With ``m_0 = 1`` and ``m_l`` the mean keep-mask after block ``l`` (over batch and all ``n``
    slots), each block costs ``2 m_{l-1} n d^2 + (m_{l-1} n)^2 d`` (attention, halved
    projections as in the original) plus ``4 m_l n d^2`` (MLP on the tokens that leave it),
    relative to the unreduced ``6 n d^2 + n^2 d``; the result is the mean over blocks.

    Args:
        masks: the ``L`` per-block keep masks (``[B, n]`` each, e.g. ``tmcore.trace(...).masks``)
            or a ``[L]`` tensor of their means.
        num_tokens: ``n``, tokens entering the first block (class token included).
        dim: ``d``, the embedding width.

    Returns:
        0-d tensor; exactly 1 for all-ones masks; differentiable in the masks.
    """
    if isinstance(masks, Tensor) and masks.dim() == 1:
        means = masks
    else:
        means = torch.stack([m.mean() for m in masks])
    m = torch.cat([means.new_ones(1), means])
    n, d = float(num_tokens), float(dim)
    per_block = (2 * m[:-1] * n * d**2 + (m[:-1] * n) ** 2 * d + 4 * m[1:] * n * d**2) / (6 * n * d**2 + n**2 * d)
    return per_block.mean()


def flops_penalty(ratio: Tensor, reduction_target: float) -> Tensor:
    """``(ratio - reduction_target)^2``: the regulariser, scaled by ``reg_scale`` in `loss`."""
    return (ratio - reduction_target) ** 2


def loss(
    logits: Tensor,
    target: Tensor,
    ratio: Tensor,
    reduction_target: float = 0.75,
    reg_scale: float = 10.0,
    cls_scale: float = 1.0,
    label_smoothing: float = 0.1,
) -> Tensor:
    """``cls_scale * CE(logits, target) + reg_scale * (ratio - reduction_target)^2`` (4.6).

    Args:
        logits: ``[B, K]``; target: ``[B]`` class indices or ``[B, K]`` probabilities.
        ratio: 0-d `flops_ratio` of the same forward.
        label_smoothing: the original trains with 0.1.
    """
    return loss_parts(logits, target, ratio, reduction_target, reg_scale, cls_scale, label_smoothing)[0]


def loss_parts(
    logits: Tensor,
    target: Tensor,
    ratio: Tensor,
    reduction_target: float,
    reg_scale: float,
    cls_scale: float,
    label_smoothing: float,
) -> tuple[Tensor, Tensor]:
    """`loss` and its cross-entropy term, ``(total, ce)`` (`fit` logs both)."""
    ce = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    return cls_scale * ce + reg_scale * flops_penalty(ratio, reduction_target), ce
