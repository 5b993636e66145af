"""Adapter for Hugging Face transformers encoders (5.x): BERT, RoBERTa, XLM-RoBERTa, DistilBERT,
ViT, DeiT and CLIP's vision tower, base models and task heads.

How a patched model runs (nothing of transformers' code is copied; `tmcore.remove` undoes all):

- Attention goes through transformers' own attention interface: the attention config of the
  patched model names ``tmcore_sdpa`` (or ``tmcore_eager``), registered by
  `tm_transformers.attention`; that function captures q / k / v for the reducer, computes explicit
  probabilities where needed and otherwise calls the user's implementation (SDPA stays fused).
- Each layer's ``forward`` is replaced by `tm_transformers.layers.layer_forward`, composed from the
  layer's public submodules, with the reduction after the attention sub-layer (or after the layer)
  and the state's additive bias passed as the attention's ``attention_mask``.
- A forward pre-hook on the base model (``model.base_model``, or CLIP's vision tower) takes the
  user's 2D ``attention_mask`` to block 0 (padding, right-padded only); a forward hook attaches
  ``token_sizes`` and ``token_mask`` ``[B, M]`` to its output for size-weighted mean pooling.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor, nn

from tm_transformers.attention import LINK, PREFIX, WRAPPED, Link, implementation_name, register
from tm_transformers.layers import LAYOUTS, layer_forward
from tmcore import Adapter, ModelInfo, NoAdapterError, Patch, TmcoreError, TokenState, UnsupportedModelError, get_patch
from tmcore.flops import BlockFlops
from tmcore.plan import unit_sizes
from tmcore.pooling import mean_pool

__all__ = ["TransformersEncoders", "FAMILIES", "Family"]

_SUPPORTED = (
    "transformers encoders: BERT, RoBERTa, XLM-RoBERTa and DistilBERT (base models and task heads), ViT and DeiT "
    "(base models and heads), CLIP's vision tower (CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel: "
    "its vision_model is patched); attention 'sdpa' or 'eager'"
)

_TOKEN_HEADS = (
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMaskedLM",
    "ForPreTraining",
    "ForMaskedImageModeling",
)
"""Heads that predict per input token: they need ``full_length=True`` (outputs at the input positions)."""

_CLIP_TOWERS = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")


@dataclass(frozen=True)
class Family:
    """One supported ``config.model_type``.

    Attributes:
        name: ``ModelInfo.family``.
        modality: ``text`` or ``vision``.
        layout: key of `tm_transformers.layers.LAYOUTS`.
        module: the modeling module that defines the classes below.
        base: the base model class (``model.base_model`` of every head).
        layer: the layer class (patched only when the type is exactly this one).
        attention: the self-attention class inside it.
        blocks: attribute path from the base model to its list of layers.
        num_protected: prefix tokens that never merge ([CLS] / <s>, DeiT's distillation token).
        position_offset: positions start after the pad id (RoBERTa), so fewer tokens fit.
    """

    name: str
    modality: str
    layout: str
    module: str
    base: str
    layer: str
    attention: str
    blocks: str
    num_protected: int = 1
    position_offset: bool = False


def _bert_like(name: str, module: str, prefix: str, offset: bool = False) -> Family:
    """BERT's layout under another name (RoBERTa and XLM-R share BERT's layer structure)."""
    return Family(
        name=f"transformers.{name}",
        modality="text",
        layout="bert",
        module=f"transformers.models.{module}",
        base=f"{prefix}Model",
        layer=f"{prefix}Layer",
        attention=f"{prefix}SelfAttention",
        blocks="encoder.layer",
        position_offset=offset,
    )


def _vit_like(name: str, module: str, prefix: str, num_protected: int = 1) -> Family:
    return Family(
        name=f"transformers.{name}",
        modality="vision",
        layout="vit",
        module=f"transformers.models.{module}",
        base=f"{prefix}Model",
        layer=f"{prefix}Layer",
        attention=f"{prefix}Attention",
        blocks="layers",
        num_protected=num_protected,
    )


FAMILIES: dict[str, Family] = {
    "bert": _bert_like("bert", "bert.modeling_bert", "Bert"),
    "roberta": _bert_like("roberta", "roberta.modeling_roberta", "Roberta", offset=True),
    "xlm-roberta": _bert_like("xlm-roberta", "xlm_roberta.modeling_xlm_roberta", "XLMRoberta", offset=True),
    "distilbert": Family(
        name="transformers.distilbert",
        modality="text",
        layout="distilbert",
        module="transformers.models.distilbert.modeling_distilbert",
        base="DistilBertModel",
        layer="TransformerBlock",
        attention="DistilBertSelfAttention",
        blocks="transformer.layer",
    ),
    "vit": _vit_like("vit", "vit.modeling_vit", "ViT"),
    "deit": _vit_like("deit", "deit.modeling_deit", "DeiT", num_protected=2),  # + distillation token
    "clip_vision_model": Family(
        name="transformers.clip",
        modality="vision",
        layout="clip",
        module="transformers.models.clip.modeling_clip",
        base="CLIPVisionModel",
        layer="CLIPEncoderLayer",
        attention="CLIPAttention",
        blocks="encoder.layers",
    ),
}
"""``config.model_type`` of the base model -> `Family` (CLIPModel resolves to its vision tower)."""

_LAYOUT_OF_LAYER = {f.layer: f.layout for f in FAMILIES.values()}


def _model_name(model: nn.Module) -> str:
    cls = type(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{cls.__module__}.{cls.__qualname__} (model_type {model_type!r})"


def _unsupported(model: nn.Module, why: str) -> NoAdapterError:
    return NoAdapterError(f"{_model_name(model)}: {why}. tmcore's transformers adapter supports {_SUPPORTED}")


def resolve(model: nn.Module) -> tuple[Family, nn.Module]:
    """``model``'s `Family` and the base model that holds its layers (CLIP: the vision tower);
    `tmcore.NoAdapterError` for anything else."""
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ("clip", "clip_vision_model", "clip_text_model"):
        if name not in _CLIP_TOWERS:
            why = (
                "its head mean-pools the patch tokens; apply tmcore to model.vision_model and pool with "
                "tmcore.pooling.mean_pool(out.last_hidden_state[:, 1:], None, out.token_sizes[:, 1:])"
                if name == "CLIPForImageClassification"
                else "CLIP's text tower is causal (a decoder-style mask), which token reduction does not support"
            )
            raise _unsupported(model, why)
        base = model if name == "CLIPVisionModel" else model.vision_model
        family = FAMILIES["clip_vision_model"]
    else:
        family = FAMILIES.get(model_type)
        if family is None:
            raise _unsupported(model, "this model type is not supported")
        base = model.base_model
    cls = getattr(sys.modules.get(family.module), family.base, None)
    if cls is None or not isinstance(base, cls):
        raise _unsupported(model, f"expected its base model to be a {family.base}, found {type(base).__name__}")
    return family, base


def _blocks(family: Family, base: nn.Module) -> Sequence[nn.Module]:
    return attrgetter(family.blocks)(base)


def _patches(image_size: int | Sequence[int], patch_size: int | Sequence[int]) -> int:
    """Patches of an image of ``image_size`` (an int or ``(height, width)``)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    return (h // ph) * (w // pw)


def _attention_mask_index(base: nn.Module) -> int | None:
    """Position of ``attention_mask`` among the base model's positional arguments, or ``None``."""
    params = list(inspect.signature(type(base).forward).parameters)[1:]  # without self
    return params.index("attention_mask") if "attention_mask" in params else None


def _padding_argument(base: nn.Module, index: int | None, args: tuple, kwargs: dict) -> Tensor | None:
    """The user's 2D padding mask among a base model call's arguments (a forward pre-hook's view);
    ``index``: its position among the positional arguments (`_attention_mask_index`)."""
    mask = kwargs.get("attention_mask")
    if mask is None and index is not None and len(args) > index:
        mask = args[index]
    if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise TmcoreError(
            f"a tmcore-patched {type(base).__name__} got an attention_mask of shape {shape}; token reduction "
            "needs the 2D [batch, tokens] padding mask (1 on real tokens, right padding)"
        )
    return mask


def _attach_sizes(output: Any, state: TokenState | None) -> None:
    """Attach the final token sizes and padding mask to a base model's output."""
    if state is None or not isinstance(output, Mapping) or output.get("last_hidden_state") is None:
        return
    hidden = output["last_hidden_state"]
    b, m = hidden.shape[:2]
    sizes = state.size[..., 0] if state.size is not None else unit_sizes(hidden)[..., 0]
    mask = state.valid.long() if state.valid is not None else torch.ones(b, m, dtype=torch.long, device=hidden.device)
    if state.mask is not None:  # training under a soft mask (LTMP): the keep-mask weighs each token
        mask = state.mask * mask
    if sizes.shape != (b, m) or mask.shape != (b, m):
        return  # the base model changed the length after the blocks: sizes would not align
    output["token_sizes"] = sizes
    output["token_mask"] = mask


class TransformersEncoders(Adapter):
    name = "transformers"
    description = _SUPPORTED
    library = "transformers"
    supported_versions = ">=5.0,<6.0"
    positions = frozenset({"attention", "layer", "start"})

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        # Every transformers model: the unsupported ones get a NoAdapterError naming their type.
        modeling = sys.modules.get("transformers.modeling_utils")
        return modeling is not None and isinstance(model, modeling.PreTrainedModel)

    def describe(self, model: nn.Module) -> ModelInfo:
        self.check(model)
        family, base = resolve(model)
        blocks = _blocks(family, base)
        cfg = base.config
        if family.modality == "text":
            num_tokens = cfg.max_position_embeddings - (cfg.pad_token_id + 1 if family.position_offset else 0)
            pool = "avg" if model is base else "token"  # a bare encoder is mean-pooled (sentence embeddings)
        else:
            num_tokens = _patches(cfg.image_size, cfg.patch_size) + family.num_protected
            pool = "token"
        return ModelInfo(
            family=family.name,
            num_layers=len(blocks),
            num_tokens=num_tokens,
            num_protected=family.num_protected,
            class_token=True,
            dim=LAYOUTS[family.layout].dims(blocks[0])[0],
            pool=pool,
            modality=family.modality,
        )

    def check(self, model: nn.Module) -> None:
        family, base = resolve(model)
        cfg = base.config
        if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            raise _unsupported(
                model, "it is configured as a decoder (is_decoder / add_cross_attention: causal mask, cache)"
            )
        module = sys.modules[family.module]
        layer_cls, attn_cls = getattr(module, family.layer), getattr(module, family.attention)
        layout = LAYOUTS[family.layout]
        for i, block in enumerate(_blocks(family, base)):
            if type(block) is not layer_cls or type(layout.attention(block)) is not attn_cls:
                raise _unsupported(
                    model, f"layer {i} is a {type(block).__qualname__}, not the {family.layer} this adapter composes"
                )
            impl = layout.attention(block).config._attn_implementation
            if impl is not None and impl not in WRAPPED and not impl.startswith(PREFIX):
                raise UnsupportedModelError(
                    f"{_model_name(model)} runs attention with {impl!r}, which can neither take tmcore's additive "
                    "attention bias (log(size), padding) nor give the attention probabilities some reducers read; "
                    "load it with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')) first"
                )

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        family, base = resolve(model)
        return _blocks(family, base)

    def patch(self, model: nn.Module, patch: Patch) -> None:
        name = type(model).__name__
        if name.endswith(_TOKEN_HEADS) and not patch.runtime.full_length:
            raise UnsupportedModelError(
                f"{name} predicts one output per input token; apply with full_length=True so its head sees the "
                "input length (tokens come back to their positions through the source map)"
            )
        register()
        self._mask_index = _attention_mask_index(resolve(model)[1])  # read once: no signature per call
        super().patch(model, patch)

    def patch_block(self, block: nn.Module, layer: int, patch: Patch) -> None:
        layout = _LAYOUT_OF_LAYER[type(block).__name__]
        attention = LAYOUTS[layout].attention(block)
        patch.bind(block, "forward", layer_forward, layout, layer)
        patch.set_attr(attention, LINK, Link(patch.runtime, layer))
        impl = attention.config._attn_implementation
        if impl is None or not impl.startswith(PREFIX):  # the config is shared: switch it once
            patch.set_attr(attention.config, "_attn_implementation_internal", implementation_name(impl))

    def forward_scope(self, model: nn.Module) -> nn.Module:
        """The base model (``model.bert``, a CLIP vision tower): task heads and ``CLIPModel``'s
        ``get_image_features`` call it, and its outputs get the sizes and padding mask."""
        return resolve(model)[1]

    def input_padding(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
        return _padding_argument(module, self._mask_index, args, kwargs)

    def finish_forward(self, module: nn.Module, output: Any, state: TokenState | None) -> None:
        _attach_sizes(output, state)

    def flops(self, model: nn.Module) -> BlockFlops:
        family, base = resolve(model)
        dim, mlp_hidden, attn_dim = LAYOUTS[family.layout].dims(_blocks(family, base)[0])
        patch = get_patch(model)
        position = patch.runtime.position if patch is not None else "attention"
        return BlockFlops(dim=dim, mlp_hidden=mlp_hidden, attn_dim=attn_dim, position=position)

    # The test kit's view of the family (tmcore.testing).

    @classmethod
    def tiny_models(cls) -> dict[str, Callable[[], nn.Module]]:
        from tm_transformers.tiny import tiny_models

        return tiny_models()

    def example_inputs(self, model: nn.Module, batch: int = 3, seed: int = 1) -> dict[str, Tensor]:
        from tm_transformers.tiny import example_inputs

        family, base = resolve(model)
        return example_inputs(base.config, family.modality, next(model.parameters()).dtype, batch, seed)

    def output_tensor(self, model: nn.Module, output: Any, inputs: dict[str, Tensor]) -> Tensor:
        """The logits; else, for text, the sentence embedding (the mean pool of the last hidden
        state, weighted by the attached ``token_sizes`` and ``token_mask``, or by the input's
        ``attention_mask`` when unpatched); else, for vision, ``pooler_output`` or the class token."""
        logits = output.get("logits") if isinstance(output, Mapping) else None
        if logits is not None:
            return logits
        hidden = output["last_hidden_state"]
        if self.describe(model).modality == "text":
            mask = output.get("token_mask", inputs.get("attention_mask"))
            return mean_pool(hidden, mask, output.get("token_sizes"))
        pooled = output.get("pooler_output")
        return pooled if pooled is not None else hidden[:, 0]
