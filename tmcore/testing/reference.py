"""Building blocks for reference tests: the seed repositories' structure, written from
ALGORITHMS.md, to check a reducer's model output against.

The seeds patch a timm-0.4 ``Block`` with an explicit softmax attention (``+ log(size)`` per key
when proportional attention is on), reduce the residual stream between attention and MLP, and
merge with closures ``merge(x, mode)`` that `merge_wavg` drives. A plugin's reference test writes
its method's ``merge`` closure from the spec and runs it through `vit_forward`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["merge_wavg", "vit_forward"]

Merge = Callable[..., Tensor]
"""``merge(x [B, N, C], mode="sum") -> [B, N - r, C]``, the seeds' closure over one layer's indices."""


def merge_wavg(merge: Merge, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """The seeds' size-weighted average (ALGORITHMS.md 1.4): ``merge(x * size) / merge(size)``.

    Args:
        merge: one layer's merge closure; x: ``[B, N, C]``; size: ``[B, N, 1]`` or ``None`` (ones).

    Returns:
        ``(x [B, M, C], size [B, M, 1])``.
    """
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def vit_forward(
    model: nn.Module,
    images: Tensor,
    reduce: Callable[[int, Tensor, Tensor | None, Tensor], tuple[Tensor, Tensor | None]],
    prop_attn: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The seeds' patched forward of a timm ``VisionTransformer`` (no LayerScale, no QK-norm).

    Args:
        model: the unpatched timm model.
        images: ``[B, 3, H, W]``.
        reduce: ``reduce(layer, x, size, keys) -> (x, size)`` after each block's attention, with
            ``keys`` ``[B, H, N, d]`` as the attention used them.
        prop_attn: add ``log(size)`` to the attention logits once sizes exist.

    Returns:
        ``(tokens [B, M, C] after the final norm, size [B, M, 1] or None)``.
    """
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = None
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        y = blk.norm1(x)
        b, n, c = y.shape
        q, k, v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if prop_attn and size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        y = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + attn.proj(y)
        x, size = reduce(i, x, size, k)
        x = x + blk.mlp(blk.norm2(x))
    return model.norm(x), size
