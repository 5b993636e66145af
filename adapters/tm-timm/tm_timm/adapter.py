"""Adapter for timm ``VisionTransformer`` and its subclasses (ViT, DeiT, distilled DeiT,
DeiT-III / LayerScale, QK-norm, register tokens, average pooling).

timm 1.0's ``Block.forward`` is two residual lines over public submodules, and
``Attention.forward`` takes an additive ``attn_mask`` on both its fused (SDPA) and explicit
paths. So the patched block forward below composes the block's own submodules with the
reduction between the two lines (or after the block, for reducers whose ``position`` is
``layer``), feeds ``log(size)`` through ``attn_mask``, and captures q / k / v with forward hooks
on ``attn.q_norm`` / ``attn.k_norm`` / ``attn.qkv`` (exactly what the attention used). No timm
forward code is copied; `tmcore.remove` restores every module. The per-forward protocol is the
core's (`tmcore.adapter`).

Where the reducer needs the attention probabilities (soft-mask training, or ``attn`` in its
needs), `_attention_probs` composes the Attention's public submodules around
`tmcore.adapter.explicit_attention`; every other forward runs the fused path unchanged.

Position ``start`` (MCTF's one-step-ahead attention): `_probe` gives the runtime q / k of the
block input (``norm1``, the q / k rows of ``qkv``, ``q_norm`` / ``k_norm``); where the reducer
then hands the block its attention probabilities, `_attention_probs` computes only the values.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from tmcore import Adapter, ModelInfo, NoAdapterError, Patch, Runtime, TmcoreError, TokenState
from tmcore.adapter import BOUND, bound_patch, explicit_attention, needs_explicit_attention, token_weights
from tmcore.flops import BlockFlops
from tmcore.pooling import weighted_mean

_SUPPORTED = (
    "timm VisionTransformer and subclasses built from timm.models.vision_transformer.Block with "
    "timm.layers.Attention: ViT, DeiT (distilled too), DeiT-III (LayerScale), QK-norm, register "
    "tokens, 'token' / 'avg' / 'max' / 'avgmax' pooling"
)


def _qkv_rows(qkv: nn.Module, x: Tensor, first: int, count: int, heads: int) -> Tensor:
    """``count`` of q, k, v (from ``first``: 0 q, 1 k, 2 v) of the fused projection ``qkv`` on
    ``x`` ``[B, N, C]``, as ``[count, B, H, N, d]``. A plain ``nn.Linear`` without hooks computes
    only those rows of its weight; anything else (hooks, LoRA or quantised wrappers) runs whole,
    so what it adds is kept."""
    b, n, _ = x.shape
    if type(qkv) is nn.Linear and not (qkv._forward_hooks or qkv._forward_pre_hooks):
        rows = slice(first * qkv.out_features // 3, (first + count) * qkv.out_features // 3)
        out = nn.functional.linear(x, qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows])
    else:
        out = qkv(x).reshape(b, n, 3, qkv.out_features // 3)[:, :, first : first + count]
    return out.reshape(b, n, count, heads, qkv.out_features // (3 * heads)).permute(2, 0, 3, 1, 4)


def _probe(attn: nn.Module, norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """q and k ``[B, H, N, d]`` of the block input ``x``, as the attention would compute them."""
    q, k = _qkv_rows(attn.qkv, norm(x), 0, 2, attn.num_heads).unbind(0)
    return attn.q_norm(q), attn.k_norm(k)


def _attention_probs(attn: nn.Module, x: Tensor, bias: Tensor | None, state: TokenState, runtime: Runtime) -> Tensor:
    """timm ``Attention`` with explicit probabilities, composed from the module's public
    submodules; q / k pass through ``q_norm`` / ``k_norm`` (their capture hooks fire as usual).
    With ``state.given_attn`` (position ``start``) only the values are computed."""
    b, n, _ = x.shape
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    if state.given_attn is not None:
        q = k = None
        v = _qkv_rows(attn.qkv, x, 2, 1, attn.num_heads)[0]
    else:
        q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
    y = explicit_attention(q, k, v, attn.scale, bias, state, runtime, attn.attn_drop)
    y = attn.norm(y.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))
    if gate is not None:
        y = y * gate
    return attn.proj_drop(attn.proj(y))


def _block_forward(
    block: nn.Module, layer: int, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """timm ``Block.forward`` with the token reduction at the reducer's position."""
    if attn_mask is not None or is_causal:
        raise TmcoreError(
            "a tmcore-patched timm block got attn_mask / is_causal from the caller; token reduction "
            "changes the sequence, so caller masks are not supported (call tmcore.remove first)"
        )
    runtime = bound_patch(block).runtime
    attend = partial(_attend, block, runtime, layer)
    probe = partial(_probe, block.attn, block.norm1) if runtime.position == "start" else None
    return runtime.run_block(
        layer, x, attend, partial(_feed_forward, block), block.attn.scale, block.training, probe=probe
    )


def _attend(
    block: nn.Module, runtime: Runtime, layer: int, x: Tensor, bias: Tensor | None, state: TokenState
) -> Tensor:
    """The block's first residual line, with ``bias`` as the attention's ``attn_mask``."""
    if needs_explicit_attention(runtime, layer, state):
        y = _attention_probs(block.attn, block.norm1(x), bias, state, runtime)
    else:
        y = block.attn(block.norm1(x), attn_mask=bias)
    return x + block.drop_path1(block.ls1(y))


def _feed_forward(block: nn.Module, x: Tensor) -> Tensor:
    """The block's second residual line."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _v_heads(heads: int, head_dim: int, qkv: Tensor) -> Tensor:
    b, n, _ = qkv.shape
    return qkv.reshape(b, n, 3, heads, head_dim)[:, :, 2].transpose(1, 2)


def _weighted_pool(model: nn.Module, x: Tensor, pool_type: str | None = None) -> Tensor:
    """``VisionTransformer.pool`` with size-weighted averaging of merged tokens; padding slots
    (ragged batches) and soft-masked tokens (training mode) weigh 0."""
    pool_type = model.global_pool if pool_type is None else pool_type
    weight = token_weights(bound_patch(model).runtime.current(), x)
    if weight is None or pool_type not in ("avg", "avgmax"):
        return type(model).pool(model, x, pool_type)
    if not model.pool_include_prefix:
        p = model.num_prefix_tokens
        x, weight = x[:, p:], weight[:, p:]
    avg = weighted_mean(x, weight)
    if pool_type == "avg":
        return avg
    top = x.masked_fill(weight == 0, float("-inf")).amax(dim=1)
    return 0.5 * (top + avg)


def _forward_intermediates(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """timm's ``forward_intermediates`` (and ``get_intermediate_layers``, which calls it) with every
    block's output spread back to the full patch grid, so the returned feature maps have the
    unreduced shape: each patch position holds its merged group's value, pruned positions zeros."""
    with bound_patch(model).runtime.dense_outputs():
        return type(model).forward_intermediates(model, *args, **kwargs)


class TimmViT(Adapter):
    name = "timm"
    description = _SUPPORTED
    library = "timm"
    supported_versions = ">=1.0,<1.1"
    positions = frozenset({"attention", "layer", "start"})

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

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.blocks

    def flops(self, model: nn.Module) -> BlockFlops:
        blk = model.blocks[0]
        patch = blk.__dict__.get(BOUND)
        position = patch.runtime.position if patch is not None else "attention"
        return BlockFlops(dim=model.embed_dim, mlp_hidden=blk.mlp.fc1.out_features, position=position)

    @classmethod
    def tiny_models(cls) -> dict[str, Callable[[], nn.Module]]:
        """ViT, distilled DeiT, LayerScale + QK-norm, register tokens with average pooling, and a
        dynamic image size (tested at 40 x 24 px): 64 patches (32 px, patch 4), 4 blocks, float64."""
        try:
            from timm.models.deit import VisionTransformerDistilled
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:
            return {}
        common = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=7)

        def make(
            model_cls: type[nn.Module], test_size: tuple[int, int] | None = None, **kw: Any
        ) -> Callable[[], nn.Module]:
            def factory() -> nn.Module:
                torch.manual_seed(0)
                model = model_cls(**{**common, **kw}).double().eval()
                if test_size:  # where timm's configs put a size to test at (read by example_inputs)
                    model.pretrained_cfg = {"input_size": (3, 32, 32), "test_input_size": (3, *test_size)}
                return model

            return factory

        return {
            "vit": make(VisionTransformer),
            "deit_distilled": make(VisionTransformerDistilled),
            "layerscale_qknorm": make(VisionTransformer, init_values=0.5, qk_norm=True),
            "reg4_avgpool": make(
                VisionTransformer, class_token=False, reg_tokens=4, global_pool="avg", no_embed_class=True
            ),
            "dynamic_size": make(VisionTransformer, dynamic_img_size=True, test_size=(40, 24)),
        }

    def example_inputs(self, model: nn.Module, batch: int = 3, seed: int = 1) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        chans = model.patch_embed.proj.in_channels
        dtype = next(model.parameters()).dtype
        size = model.patch_embed.img_size
        test_size = (getattr(model, "pretrained_cfg", None) or {}).get("test_input_size")
        if model.dynamic_img_size and test_size:  # the size it is meant to be tested at
            size = test_size[1:]
        return {"x": torch.randn(batch, chans, *size, generator=gen, dtype=dtype)}

    def check(self, model: nn.Module) -> None:
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

    def patch_block(self, block: nn.Module, layer: int, patch: Patch) -> None:
        runtime = patch.runtime
        needs = runtime.layer_needs[layer]  # blocks that need nothing keep fused attention and get no hooks
        patch.bind(block, "forward", _block_forward, layer)
        attn = block.attn
        if runtime.position == "start":  # q / k come from the probe, before the attention runs
            needs = needs - {"keys", "cls_attn", "attn"}
        if needs & {"keys", "cls_attn", "attn"}:
            patch.capture(attn.k_norm, "k")
        if needs & {"cls_attn", "attn"}:
            patch.capture(attn.q_norm, "q")
        if "values" in needs:
            patch.capture(attn.qkv, "v", partial(_v_heads, attn.num_heads, attn.head_dim))

    def patch_model(self, model: nn.Module, patch: Patch) -> None:
        patch.bind(model, "forward_intermediates", _forward_intermediates)
        if model.global_pool in ("avg", "avgmax"):
            patch.bind(model, "pool", _weighted_pool)
