"""Adapter for diffusers' diffusion models: the Stable Diffusion UNets (SD 1.x / 2.x / XL layouts of
``UNet2DConditionModel``) and the diffusion transformers built from the same blocks (DiT, PixArt
and the legacy ``Transformer2DModel``; SD3's ``SD3Transformer2DModel``).

Diffusion keeps every spatial token between blocks (the UNet's convolutions need the full grid),
so these models reduce in block scope (`tmcore.reducer.SCOPES`): each block computes one plan
from its input and its sub-layers run on the merged tokens, their outputs spread back to every
token before the residual add (ToMe for Stable Diffusion's scheme). The block's own forward runs
unchanged; what is patched is the forward of the sub-layer modules it calls, ``attn1`` /
``attn2`` / ``ff`` of a ``BasicTransformerBlock`` and ``attn`` / ``attn2`` / ``ff`` of SD3's
``JointTransformerBlock``: each merges its input and unmerges its output
(`tmcore.Runtime.merge` / ``unmerge``). The norms (layer norm, AdaLN, AdaLN-Zero, AdaLN-single,
continuous), gates, positional embeddings and GLIGEN of every diffusers version stay the
block's own, the attention processors (SDPA) stay fused, and no diffusers forward is copied.

A gate or scale the block multiplies a sub-layer's output by is per channel, so it commutes with
the unmerge: applying it after (as the block does) equals tomesd's order. The latent's grid comes
from the model's input (`input_grid`): the UNet's ``sample`` in latent pixels, a transformer's in
patches; each block's grid and downsampling factor follow from its token count
(`tmcore.runtime.block_grid`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from tmcore import Adapter, ModelInfo, NoAdapterError, Patch, TmcoreError
from tmcore.adapter import bound_patch

_SUPPORTED = (
    "diffusers UNet2DConditionModel (SD 1.x / 2.x / XL layouts), DiTTransformer2DModel, "
    "PixArtTransformer2DModel, Transformer2DModel with patches, and SD3Transformer2DModel, whose transformer "
    "blocks are diffusers' BasicTransformerBlock or JointTransformerBlock"
)

_CONTEXT = 77
"""Text tokens of the example conditioning (CLIP's context length, as in Stable Diffusion)."""

_MODELS = (
    "UNet2DConditionModel",
    "DiTTransformer2DModel",
    "PixArtTransformer2DModel",
    "Transformer2DModel",
    "SD3Transformer2DModel",
)


def _block_classes() -> tuple[type[nn.Module], ...]:
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock

    return BasicTransformerBlock, JointTransformerBlock


def _keys(attn: nn.Module, h: Tensor) -> Tensor:
    """``[B, H, N, d]``: the keys ``attn`` (a diffusers ``Attention``) computes from ``h`` ``[B, N, C]``
    in self-attention, its key norm included (per head, or across heads where it normalises the
    whole projection)."""
    k = attn.to_k(h)
    b, n, inner = k.shape
    norm = getattr(attn, "norm_k", None)
    across = norm is not None and getattr(norm, "normalized_shape", getattr(norm, "dim", None)) in ((inner,), inner)
    if across:
        k = norm(k)
    k = k.view(b, n, attn.heads, inner // attn.heads).transpose(1, 2)
    return k if norm is None or across else norm(k)


def _sublayer_forward(
    module: nn.Module, layer: int, sublayer: str, forward: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """A sub-layer of block ``layer`` on the merged tokens, its output back on all of them. The
    first argument (or ``hidden_states``) is the sub-layer's input; an attention that returns a
    pair (SD3's joint attention: image tokens, text tokens) is unmerged on its first element."""
    runtime = bound_patch(module).runtime
    if args:
        h, args = args[0], args[1:]
    else:
        h = kwargs.pop("hidden_states")
    keys = partial(_keys, module) if sublayer == "attn" else None
    h, bias = runtime.merge(layer, sublayer, h, keys, getattr(module, "scale", 1.0))
    if bias is not None:
        if kwargs.get("attention_mask") is not None:
            raise TmcoreError(
                f"block {layer}'s self-attention got an attention_mask from the caller; merging changes its keys, so "
                "a caller mask cannot be combined with a reducer's proportional attention (prop_attn=False, or "
                "tmcore.remove)"
            )
        kwargs["attention_mask"] = bias[:, 0]  # [B, 1, M]: the processor repeats it over heads
    out = forward(h, *args, **kwargs)
    if isinstance(out, tuple):
        return (runtime.unmerge(layer, sublayer, out[0]), *out[1:])
    return runtime.unmerge(layer, sublayer, out)


def _block_forward(block: nn.Module, layer: int, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The block's own forward between `tmcore.Runtime.open_block` and ``close_block``."""
    runtime = bound_patch(block).runtime
    x = args[0] if args else kwargs["hidden_states"]
    state = runtime.open_block(layer, x, block.training)
    out = forward(*args, **kwargs)
    if isinstance(out, tuple):  # JointTransformerBlock: (text tokens, image tokens)
        return (out[0], runtime.close_block(layer, out[1], state))
    return runtime.close_block(layer, out, state)


def _first_attention(block: nn.Module) -> nn.Module:
    return block.attn if type(block).__name__ == "JointTransformerBlock" else block.attn1


def _sample_size(model: nn.Module) -> tuple[int, int]:
    size = model.config.sample_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class Diffusers(Adapter):
    name = "diffusers"
    description = _SUPPORTED
    library = "diffusers"
    supported_versions = ">=0.30,<0.43"
    inputs = frozenset({"keys"})
    positions = frozenset({"attention"})
    model_classes = _MODELS
    """The diffusers model classes it patches, by name (``tmcore bench --model diffusers:`` loads these only)."""

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        if "diffusers" not in sys.modules:
            return False
        return type(model).__name__ in _MODELS and type(model).__module__.startswith("diffusers.")

    def _patch_size(self, model: nn.Module) -> int:
        """1 for a UNet (its blocks see latent pixels), the patch size of a transformer."""
        return 1 if type(model).__name__ == "UNet2DConditionModel" else int(model.config.patch_size or 1)

    def describe(self, model: nn.Module) -> ModelInfo:
        self.check(model)
        blocks = self.blocks(model)
        height, width = _sample_size(model)
        p = self._patch_size(model)
        grid = (height // p, width // p)
        return ModelInfo(
            family=f"diffusers.{type(model).__name__}",
            num_layers=len(blocks),
            num_tokens=grid[0] * grid[1],
            num_protected=0,
            class_token=False,
            dim=_first_attention(blocks[0]).to_q.in_features,
            pool="",
            scope="block",
            grid=grid,
            size_bias=type(blocks[0]).__name__ != "JointTransformerBlock",  # its processor ignores masks
        )

    def check(self, model: nn.Module) -> None:
        name = f"{type(model).__module__}.{type(model).__qualname__}"
        if not self.blocks(model):
            raise NoAdapterError(
                f"{name} has no transformer block the diffusers adapter knows. Supported: {_SUPPORTED}"
            )
        if type(model).__name__ == "Transformer2DModel" and not model.is_input_patches:
            raise NoAdapterError(
                f"{name}: a Transformer2DModel on continuous or discrete inputs is a UNet's inner part; apply "
                f"tmcore to the UNet. Supported: {_SUPPORTED}"
            )

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks in the order the forward runs them (a UNet registers its up
        blocks before its mid block, but runs down, mid, up)."""
        classes = _block_classes()
        if type(model).__name__ == "UNet2DConditionModel":
            parts = [*model.down_blocks, *([model.mid_block] if model.mid_block is not None else []), *model.up_blocks]
        else:
            parts = [model]
        return [m for part in parts for m in part.modules() if type(m) in classes]

    def input_grid(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if not isinstance(sample, Tensor) or sample.dim() != 4:
            return None
        p = self._patch_size(module)
        return (sample.shape[-2] // p, sample.shape[-1] // p)

    def patch_block(self, block: nn.Module, layer: int, patch: Patch) -> None:
        runtime = patch.runtime
        patch.bind(block, "forward", _block_forward, layer, block.forward)
        joint = type(block).__name__ == "JointTransformerBlock"
        # the first self-attention always: the block's plan is computed there (its keys, its input)
        subs = [("attn" if joint else "attn1", "attn")]
        if getattr(block, "attn2", None) is not None:
            if joint:  # SD3.5's second self-attention
                subs.append(("attn2", "attn"))
            elif "cross_attn" in runtime.sublayers:
                subs.append(("attn2", "cross_attn"))
        if "mlp" in runtime.sublayers:
            subs.append(("ff", "mlp"))
        for attr, sublayer in subs:
            module = getattr(block, attr)
            patch.bind(module, "forward", _sublayer_forward, layer, sublayer, module.forward)

    def flops(self, model: nn.Module) -> None:
        """No analytic model: a diffusion model's cost is mostly its convolutions and depends on
        the conditioning's length; ``tmcore bench`` counts one forward with
        ``torch.utils.flop_counter``."""
        return None

    @classmethod
    def tiny_models(cls) -> dict[str, Callable[[], nn.Module]]:
        """An SD-1.x-style UNet (cross-attention blocks at two resolutions, 8 x 8 latents: 64 and 16
        tokens), a DiT (AdaLN-Zero, class labels), PixArt (AdaLN-single, captions) and SD3 (joint
        attention), 16 x 16 latents in 2 x 2 patches (64 tokens); float64, eval mode."""
        try:
            import diffusers
        except ImportError:
            return {}

        def make(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
            def factory() -> nn.Module:
                torch.manual_seed(0)
                model = build().double().eval()
                for m in model.modules():  # DiT drops class labels at random in training mode: not here
                    if type(m).__name__ == "LabelEmbedding":
                        m.dropout_prob = 0.0
                return model

            return factory

        # the diffusion transformers: 16 x 16 latents in 2 x 2 patches (64 tokens), 3 blocks of 16 channels
        transformer = dict(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=3,
            num_attention_heads=2,
            attention_head_dim=8,
        )
        return {
            "unet": make(
                lambda: diffusers.UNet2DConditionModel(
                    sample_size=8,
                    in_channels=4,
                    out_channels=4,
                    block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    layers_per_block=1,
                    cross_attention_dim=24,
                    attention_head_dim=8,
                    norm_num_groups=8,
                )
            ),
            "dit": make(lambda: diffusers.DiTTransformer2DModel(**transformer, num_embeds_ada_norm=10)),
            "pixart": make(
                lambda: diffusers.PixArtTransformer2DModel(
                    **transformer, cross_attention_dim=16, caption_channels=24, use_additional_conditions=False
                )
            ),
            "sd3": make(
                lambda: diffusers.SD3Transformer2DModel(
                    **transformer,
                    joint_attention_dim=24,
                    caption_projection_dim=16,
                    pooled_projection_dim=12,
                    pos_embed_max_size=16,
                )
            ),
        }

    def example_inputs(self, model: nn.Module, batch: int = 3, seed: int = 1) -> dict[str, Any]:
        """Random latents, timesteps and the conditioning each model takes: text states of 77
        tokens (the CLIP length Stable Diffusion conditions on), class labels, pooled text."""
        gen = torch.Generator().manual_seed(seed)
        dtype = next(model.parameters()).dtype
        cfg = model.config
        height, width = _sample_size(model)
        latents = torch.randn(batch, cfg.in_channels, height, width, generator=gen, dtype=dtype)
        timestep = torch.randint(0, 1000, (batch,), generator=gen)
        kind = type(model).__name__
        if kind == "UNet2DConditionModel":
            context = torch.randn(batch, _CONTEXT, cfg.cross_attention_dim, generator=gen, dtype=dtype)
            return {"sample": latents, "timestep": timestep, "encoder_hidden_states": context}
        if kind == "DiTTransformer2DModel":
            labels = torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=gen)
            return {"hidden_states": latents, "timestep": timestep, "class_labels": labels}
        if kind == "PixArtTransformer2DModel":
            context = torch.randn(batch, _CONTEXT, cfg.caption_channels, generator=gen, dtype=dtype)
            return {
                "hidden_states": latents,
                "timestep": timestep,
                "encoder_hidden_states": context,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            }
        if kind == "SD3Transformer2DModel":
            context = torch.randn(batch, _CONTEXT, cfg.joint_attention_dim, generator=gen, dtype=dtype)
            pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=gen, dtype=dtype)
            return {
                "hidden_states": latents,
                "timestep": timestep,
                "encoder_hidden_states": context,
                "pooled_projections": pooled,
            }
        raise NoAdapterError(f"no example inputs for {kind}")

    def output_tensor(self, model: nn.Module, output: Any, inputs: dict[str, Tensor]) -> Tensor:
        """The predicted noise (or velocity), ``[B, C, H, W]``."""
        return output.sample if hasattr(output, "sample") else output[0]
