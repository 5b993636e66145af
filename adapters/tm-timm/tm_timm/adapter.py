"""Adapter for timm ``VisionTransformer`` and its subclasses (ViT, DeiT, distilled DeiT,
DeiT-III / LayerScale, QK-norm, register tokens, average pooling).

timm 1.0's ``Block.forward`` is two residual lines over public submodules, and
``Attention.forward`` takes an additive ``attn_mask`` on both its fused (SDPA) and explicit
paths. So the patched block forward below composes the block's own submodules with the
reduction between the two lines, feeds ``log(size)`` through ``attn_mask``, and captures q / k /
v with forward hooks on ``attn.q_norm`` / ``attn.k_norm`` / ``attn.qkv`` (exactly what the
attention used). No timm forward code is copied; `tmcore.remove` restores every module.

Two kinds of forward need the attention probabilities themselves, which the fused path never
materialises: soft-mask training (reducers with ``soft_step``, e.g. LTMP in ``train()``: the
keep-mask must enter the softmax, which no public argument allows) and reducers that read the
full attention (``requires`` ``attn``, e.g. LTMP's importance). For those, `_explicit_attention`
composes the Attention's public submodules around the softmax once and hands the probabilities to
the reducer. Every other forward runs the fused path above unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from tmcore import Adapter, ModelInfo, NoAdapterError, Patch, Runtime, TmcoreError

_SUPPORTED = (
    "timm VisionTransformer and subclasses built from timm.models.vision_transformer.Block with "
    "timm.layers.Attention: ViT, DeiT (distilled too), DeiT-III (LayerScale), QK-norm, register "
    "tokens, 'token' / 'avg' / 'max' / 'avgmax' pooling"
)


def _attn_dtype(x: Tensor) -> torch.dtype:
    """The dtype q/k will have inside attention (SDPA wants the float mask to match it)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _softmax(logits: Tensor) -> Tensor:
    return logits.softmax(dim=-1)


def _explicit_attention(
    attn: nn.Module, x: Tensor, bias: Tensor | None, softmax: Callable[[Tensor], Tensor], runtime: Runtime
) -> Tensor:
    """timm ``Attention`` with its probabilities computed explicitly, composed from the module's
    public submodules, for the forwards that need them: a soft keep-mask must enter the softmax
    (``softmax`` is `TokenState.attn_probs`; gradients reach the mask), or the reducer reads the
    full attention (LTMP's importance), which is then computed once instead of fused + again.
    q / k pass through ``q_norm`` / ``k_norm`` (their capture hooks fire as usual); the
    probabilities, after ``attn_drop`` as the attention uses them, are captured as ``attn``."""
    b, n, _ = x.shape
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits += bias  # in place: a [B, H, N, N] allocation less (the matmul's backward needs q, k only)
    probs = attn.attn_drop(softmax(logits))
    runtime.capture("attn", probs)
    y = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)
    y = attn.norm(y)
    if gate is not None:
        y = y * gate
    return attn.proj_drop(attn.proj(y))


def _block_forward(
    block: nn.Module,
    runtime: Runtime,
    layer: int,
    explicit: bool,
    x: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """timm ``Block.forward`` with the token reduction between attention and MLP; ``explicit``:
    the reducer reads the full attention probabilities (see `_explicit_attention`)."""
    if attn_mask is not None or is_causal:
        raise TmcoreError(
            "a tmcore-patched timm block got attn_mask / is_causal from the caller; token reduction "
            "changes the sequence, so caller masks are not supported (call tmcore.remove first)"
        )
    state = runtime.enter(layer, x, block.training)
    bias = state.attn_bias(_attn_dtype(x))
    if state.mask is not None:
        y = _explicit_attention(block.attn, block.norm1(x), bias, state.attn_probs, runtime)
    elif explicit:
        y = _explicit_attention(block.attn, block.norm1(x), bias, _softmax, runtime)
    else:
        y = block.attn(block.norm1(x), attn_mask=bias)
    x = x + block.drop_path1(block.ls1(y))
    x = runtime.step(layer, x, state, bias, block.attn.scale)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    runtime.exit(layer, x, state)
    return x


def _capture(runtime: Runtime, name: str, module: nn.Module, args: Any, output: Tensor) -> None:
    runtime.capture(name, output)


def _capture_v(runtime: Runtime, heads: int, head_dim: int, module: nn.Module, args: Any, output: Tensor) -> None:
    b, n, _ = output.shape
    runtime.capture("v", output.reshape(b, n, 3, heads, head_dim)[:, :, 2].transpose(1, 2))


def _clear_state(runtime: Runtime, module: nn.Module, args: Any, output: Any) -> None:
    runtime.clear()


def _weighted_pool(model: nn.Module, runtime: Runtime, x: Tensor, pool_type: str | None = None) -> Tensor:
    """``VisionTransformer.pool`` with size-weighted averaging of merged tokens; padding slots
    (ragged batches) and soft-masked tokens (training mode) weigh 0."""
    pool_type = model.global_pool if pool_type is None else pool_type
    state = runtime.current()
    if (
        state is None
        or (state.size is None and state.valid is None and state.mask is None)
        or pool_type not in ("avg", "avgmax")
    ):
        return type(model).pool(model, x, pool_type)
    size = state.size if state.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)
    if state.valid is not None:
        size = size * state.valid.unsqueeze(-1)
    if state.mask is not None:
        size = size * state.mask.unsqueeze(-1)
    if not model.pool_include_prefix:
        p = model.num_prefix_tokens
        x, size = x[:, p:], size[:, p:]
    size = size.to(x.dtype)
    avg = (x * size).sum(dim=1) / size.sum(dim=1)
    if pool_type == "avg":
        return avg
    top = x.masked_fill(size == 0, float("-inf")).amax(dim=1)
    return 0.5 * (top + avg)


class TimmViT(Adapter):
    name = "timm"
    description = _SUPPORTED
    library = "timm"
    supported_versions = ("1.0", "1.1")

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        vit = sys.modules.get("timm.models.vision_transformer")
        return vit is not None and isinstance(model, vit.VisionTransformer)

    def describe(self, model: nn.Module) -> ModelInfo:
        tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag") or ""
        return ModelInfo(
            family="timm.vit",
            num_layers=len(model.blocks),
            num_tokens=model.patch_embed.num_patches + model.num_prefix_tokens,
            num_protected=model.num_prefix_tokens,
            class_token=model.cls_token is not None,
            dim=model.embed_dim,
            pool="map" if model.attn_pool is not None else model.global_pool,
            mae="mae" in tag.split("_"),
        )

    def _check(self, model: nn.Module) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        name = f"{type(model).__module__}.{type(model).__qualname__}"
        for i, blk in enumerate(model.blocks):
            if type(blk).forward is not Block.forward:
                raise NoAdapterError(
                    f"{name}: block {i} is a {type(blk).__qualname__}, which the timm adapter does not "
                    f"support. Supported: {_SUPPORTED}"
                )
            if type(blk.attn).forward is not Attention.forward:
                raise NoAdapterError(
                    f"{name}: block {i} uses attention {type(blk.attn).__qualname__}, which the timm "
                    f"adapter does not support. Supported: {_SUPPORTED}"
                )
        if model.attn_pool is not None:
            raise NoAdapterError(
                f"{name}: attention pooling (global_pool='map') is not supported by the timm adapter. "
                f"Supported: {_SUPPORTED}"
            )

    def patch(self, model: nn.Module, patch: Patch) -> None:
        self._check(model)
        runtime = patch.runtime
        for i, blk in enumerate(model.blocks):
            needs = runtime.layer_needs[i]  # blocks that need nothing keep fused attention and get no hooks
            patch.set_attr(blk, "forward", partial(_block_forward, blk, runtime, i, "attn" in needs))
            attn = blk.attn
            if needs & {"keys", "cls_attn", "attn"}:
                patch.add_hook(attn.k_norm.register_forward_hook(partial(_capture, runtime, "k")))
            if needs & {"cls_attn", "attn"}:
                patch.add_hook(attn.q_norm.register_forward_hook(partial(_capture, runtime, "q")))
            if "values" in needs:
                patch.add_hook(
                    attn.qkv.register_forward_hook(partial(_capture_v, runtime, attn.num_heads, attn.head_dim))
                )
        if model.global_pool in ("avg", "avgmax"):
            patch.set_attr(model, "pool", partial(_weighted_pool, model, runtime))
        patch.add_hook(model.register_forward_hook(partial(_clear_state, runtime), always_call=True))
