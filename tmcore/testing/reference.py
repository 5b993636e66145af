"""Building blocks for reference tests: the seed repositories' structure, written from
docs/algorithms.md, to check a reducer's model output against.

The seeds patch a timm-0.4 ``Block`` with an explicit softmax attention (``+ log(size)`` per key
when proportional attention is on), reduce the residual stream between attention and MLP, and
merge with closures ``merge(x, mode)`` that `merge_wavg` drives. A plugin's reference test writes
its method's ``merge`` closure from the spec and runs it through `vit_forward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["bipartite_soft_matching", "float64_timm", "merge_wavg", "vit_forward"]

Merge = Callable[..., Tensor]
"""``merge(x [B, N, C], mode="sum") -> [B, N - r, C]``, the seeds' closure over one layer's indices."""


def bipartite_soft_matching(metric: Tensor, r: int, class_token: bool, distill_token: bool) -> Merge:
    """ToMe's bipartite soft matching (docs/algorithms.md 1.3) in the seeds' structure, shared by the
    ToMe, ToMeCIS and PPT references (all three seeds copy ToMe's ``merge.py``): indices computed
    once under ``no_grad``, applied to anything by the returned ``merge(x, mode)``.

    ``r`` is clamped to half of the unprotected tokens; ``r <= 0`` returns the identity. Ties
    are broken by a stable sort (the one deliberate difference from the seeds, as in tmcore).
    """
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    if r <= 0:
        return lambda x, mode="sum": x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="sum"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Merge, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """The seeds' size-weighted average (docs/algorithms.md 1.4): ``merge(x * size) / merge(size)``.

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
    reduce: Callable[..., tuple[Tensor, Tensor | None]],
    prop_attn: bool = False,
    attention: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The seeds' patched forward of a timm ``VisionTransformer`` (no LayerScale, no QK-norm).

    Args:
        model: the unpatched timm model.
        images: ``[B, 3, H, W]``.
        reduce: ``reduce(layer, x, size, keys) -> (x, size)`` after each block's attention, with
            ``keys`` ``[B, H, N, d]`` as the attention used them; with ``attention``,
            ``reduce(layer, x, size, keys, attn, values)`` with the probabilities ``attn``
            ``[B, H, N, N]`` (bias included) and ``values`` ``[B, H, N, d]`` too.
        prop_attn: add ``log(size)`` to the attention logits once sizes exist.
        attention: also hand the attention probabilities and values to ``reduce``.

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
        probs = logits.softmax(dim=-1)
        y = (probs @ v).transpose(1, 2).reshape(b, n, c)
        x = x + attn.proj(y)
        x, size = reduce(i, x, size, k, probs, v) if attention else reduce(i, x, size, k)
        x = x + blk.mlp(blk.norm2(x))
    return model.norm(x), size


def float64_timm(name: str, batch: int = 2, **kwargs: object) -> tuple[nn.Module, Tensor]:
    """A random-init timm model in float64 (eval mode) and ``batch`` random images of its input
    size, both drawn after ``torch.manual_seed(0)``: the set-up of every reference test, where
    float64 keeps near-tied similarities from deciding a comparison.

    ``kwargs`` go to ``timm.create_model`` (e.g. ``depth=4``, ``img_size=96``).
    """
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).double().eval()
    return model, torch.randn(batch, 3, *model.patch_embed.img_size, dtype=torch.float64)
