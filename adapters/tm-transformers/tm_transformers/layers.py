"""Patched layer forwards, composed from each layer's public submodules (no transformers code
copied), with the token reduction at the reducer's position.

Four layouts cover the supported families:

- ``bert`` (BERT, RoBERTa, XLM-R; post-norm): ``attention.self`` -> ``attention.output`` (dense,
  dropout, LayerNorm with the residual) -> [reduce: ``attention``] -> ``intermediate`` ->
  ``output`` -> [reduce: ``layer``].
- ``distilbert`` (post-norm): ``attention`` (incl. ``out_lin``) -> ``sa_layer_norm`` with the
  residual -> [reduce] -> ``ffn`` -> ``output_layer_norm`` with the residual -> [reduce].
- ``vit`` (ViT, DeiT; pre-norm): ``layernorm_before`` -> ``attention`` -> ``dropout`` + residual ->
  [reduce] -> ``layernorm_after`` -> ``mlp`` -> ``dropout`` + residual -> [reduce].
- ``clip`` (pre-norm): ``layer_norm1`` -> ``self_attn`` + residual -> [reduce] -> ``layer_norm2`` ->
  ``mlp`` + residual -> [reduce].

Position ``start`` (MCTF's one-step-ahead attention) reduces the layer input before the
attention; each layout's ``probe`` gives the runtime q / k of that input as the attention would
compute them (BERT's and DistilBERT's attention read the input itself, post-norm; ViT / DeiT's
and CLIP's read it after their first LayerNorm).

The attention submodule gets the state's additive bias (``log(size)``, the lowest value on
padding) as its own ``attention_mask`` argument; the mask the encoder passes is for the unreduced length and is
ignored (block 0 takes the padding from the base model's 2D ``attention_mask``, which the forward
pre-hook hands to `tmcore.Runtime.begin`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from tm_transformers.attention import PREFIX
from tmcore import Runtime, TmcoreError
from tmcore.adapter import bound_patch

__all__ = ["LAYOUTS", "Layout", "layer_forward"]

# Arguments a decoder layer receives; an encoder gets None for each (or nothing).
_DECODER_ARGS = ("encoder_hidden_states", "encoder_attention_mask", "cache", "past_key_values", "past_key_value")


@dataclass(frozen=True)
class Layout:
    """How one family's layer is built from its public submodules.

    Attributes:
        attention: ``(block) -> module`` whose ``config`` selects the attention function.
        scale: ``(block) -> float``, the logit scale that attention uses.
        attend: ``(block, x, bias, kwargs) -> x``, the attention sub-layer with its residual / norm.
        feed_forward: ``(block, x) -> x``, the MLP sub-layer with its residual / norm.
        dims: ``(block) -> (dim, mlp_hidden, attn_dim)`` for the FLOP model.
        probe: ``(block, x) -> (q, k)`` ``[B, H, N, d]`` of the layer input ``x``, as its
            attention computes them (position ``start``).
    """

    attention: Callable[[nn.Module], nn.Module]
    scale: Callable[[nn.Module], float]
    attend: Callable[[nn.Module, Tensor, Tensor | None, dict[str, Any]], Tensor]
    feed_forward: Callable[[nn.Module, Tensor], Tensor]
    dims: Callable[[nn.Module], tuple[int, int, int]]
    probe: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]


def _heads(linear: nn.Module, x: Tensor, head_dim: int) -> Tensor:
    """``[B, N, C]`` -> ``[B, H, N, d]``: a q / k projection split into heads, as the attention does."""
    return linear(x).view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def _bert_probe(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    a = block.attention.self
    return _heads(a.query, x, a.attention_head_size), _heads(a.key, x, a.attention_head_size)


def _distilbert_probe(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    a = block.attention
    return _heads(a.q_lin, x, a.attention_head_size), _heads(a.k_lin, x, a.attention_head_size)


def _vit_probe(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    a, h = block.attention, block.layernorm_before(x)
    return _heads(a.q_proj, h, a.head_dim), _heads(a.k_proj, h, a.head_dim)


def _clip_probe(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    a, h = block.self_attn, block.layer_norm1(x)
    return _heads(a.q_proj, h, a.head_dim), _heads(a.k_proj, h, a.head_dim)


def _bert_attend(block: nn.Module, x: Tensor, bias: Tensor | None, kwargs: dict[str, Any]) -> Tensor:
    y, _ = block.attention.self(x, attention_mask=bias, **kwargs)
    return block.attention.output(y, x)  # dense, dropout, LayerNorm(y + x)


def _bert_feed_forward(block: nn.Module, x: Tensor) -> Tensor:
    return block.output(block.intermediate(x), x)


def _distilbert_attend(block: nn.Module, x: Tensor, bias: Tensor | None, kwargs: dict[str, Any]) -> Tensor:
    y, _ = block.attention(x, attention_mask=bias, **kwargs)
    return block.sa_layer_norm(y + x)


def _distilbert_feed_forward(block: nn.Module, x: Tensor) -> Tensor:
    return block.output_layer_norm(block.ffn(x) + x)


def _vit_attend(block: nn.Module, x: Tensor, bias: Tensor | None, kwargs: dict[str, Any]) -> Tensor:
    y, _ = block.attention(block.layernorm_before(x), bias, **kwargs)
    return block.dropout(y) + x


def _vit_feed_forward(block: nn.Module, x: Tensor) -> Tensor:
    return block.dropout(block.mlp(block.layernorm_after(x))) + x


def _clip_attend(block: nn.Module, x: Tensor, bias: Tensor | None, kwargs: dict[str, Any]) -> Tensor:
    y, _ = block.self_attn(hidden_states=block.layer_norm1(x), attention_mask=bias, **kwargs)
    return x + y


def _clip_feed_forward(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.mlp(block.layer_norm2(x))


def _linear_dims(q: nn.Linear, fc1: nn.Linear) -> tuple[int, int, int]:
    return q.in_features, fc1.out_features, q.out_features


LAYOUTS: dict[str, Layout] = {
    "bert": Layout(
        attention=lambda b: b.attention.self,
        scale=lambda b: b.attention.self.scaling,
        attend=_bert_attend,
        feed_forward=_bert_feed_forward,
        dims=lambda b: _linear_dims(b.attention.self.query, b.intermediate.dense),
        probe=_bert_probe,
    ),
    "distilbert": Layout(
        attention=lambda b: b.attention,
        scale=lambda b: b.attention.scaling,
        attend=_distilbert_attend,
        feed_forward=_distilbert_feed_forward,
        dims=lambda b: _linear_dims(b.attention.q_lin, b.ffn.lin1),
        probe=_distilbert_probe,
    ),
    "vit": Layout(
        attention=lambda b: b.attention,
        scale=lambda b: b.attention.scaling,
        attend=_vit_attend,
        feed_forward=_vit_feed_forward,
        dims=lambda b: _linear_dims(b.attention.q_proj, b.mlp.fc1),
        probe=_vit_probe,
    ),
    "clip": Layout(
        attention=lambda b: b.self_attn,
        scale=lambda b: b.self_attn.scale,
        attend=_clip_attend,
        feed_forward=_clip_feed_forward,
        dims=lambda b: _linear_dims(b.self_attn.q_proj, b.mlp.fc1),
        probe=_clip_probe,
    ),
}
"""Layout name -> `Layout` (the patched forwards hold the name: plain data in the undo log)."""


def layer_forward(
    block: nn.Module,
    layout: str,
    layer: int,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> Tensor:
    """A supported layer's forward with the reduction at ``runtime.position``.

    Args:
        block, layout, layer: bound by the adapter (`tmcore.Patch.bind`; the runtime is
            ``bound_patch(block).runtime``); ``layout`` is a key of `LAYOUTS`.
        hidden_states: ``[B, N, C]``.
        attention_mask: the encoder's mask for the unreduced length: ignored (block 0 takes the
            input's padding from the base model's call, `tmcore.Runtime.begin`; the state's bias
            carries it afterwards).
        args, kwargs: the rest of the layer's call; decoder arguments must be unset, the others
            (e.g. ``position_ids``) go to the attention as in the unpatched layer.

    Returns:
        ``[B, M, C]``: ``M < N`` after a reduction, ``N`` again at the last block with ``full_length``.
    """
    kwargs = _encoder_kwargs(args, kwargs)
    runtime = bound_patch(block).runtime
    if layer == 0 and attention_mask is not None and not runtime.in_forward():
        raise TmcoreError(
            "a tmcore-patched transformers layer got an attention mask, but the model itself was not called; "
            "call the model (model(input_ids, attention_mask=...)) so tmcore sees the 2D padding mask"
        )
    run = partial(_reduced_forward, layout, block, runtime, layer, kwargs=kwargs)
    if getattr(block, "gradient_checkpointing", False) and block.training and torch.is_grad_enabled():
        # transformers checkpoints the class's forward, which this instance forward replaces: do the
        # same here (the runtime replays the block's state when the backward pass recomputes it)
        return block._gradient_checkpointing_func(run, hidden_states)
    return run(hidden_states)


def _reduced_forward(layout: str, block: nn.Module, runtime: Runtime, layer: int, x: Tensor, kwargs: dict) -> Tensor:
    """`layer_forward`'s work on ``x`` ``[B, N, C]``, the part gradient checkpointing recomputes."""
    spec = LAYOUTS[layout]
    _check_dispatch(spec.attention(block), runtime, layer)
    attend = partial(_attend, spec.attend, block, kwargs)
    probe = partial(spec.probe, block) if runtime.position == "start" else None
    return runtime.run_block(
        layer, x, attend, partial(spec.feed_forward, block), spec.scale(block), block.training, probe=probe
    )


def _attend(attend: Callable, block: nn.Module, kwargs: dict, x: Tensor, bias: Tensor | None, state: Any) -> Tensor:
    return attend(block, x, bias, kwargs)  # tmcore's attention function reads the state itself


def _encoder_kwargs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that go on to the attention; refuses decoder inputs (cross-attention
    states, caches), whose lengths token reduction would break."""
    given = [name for name in _DECODER_ARGS if kwargs.get(name) is not None]
    if any(a is not None for a in args) or given:
        raise TmcoreError(
            f"a tmcore-patched transformers layer got decoder inputs ({', '.join(given) or 'positional'}); "
            "token reduction supports encoders only (no cross-attention, no cache)"
        )
    return {k: v for k, v in kwargs.items() if k not in _DECODER_ARGS and k != "use_cache"}


def _check_dispatch(attention: nn.Module, runtime: Runtime, layer: int) -> None:
    """The attention must still dispatch to tmcore's function: its bias and probabilities travel there."""
    impl = attention.config._attn_implementation
    if impl is None or not impl.startswith(PREFIX):
        needs = runtime.layer_needs[layer]
        what = "the attention probabilities" if "attn" in needs else "the q / k / v" if needs else ""
        raise TmcoreError(
            f"block {layer}'s attention now dispatches to {impl!r} (set after tmcore.apply), which cannot take "
            f"tmcore's attention bias (sizes, padding){' nor give ' + what + ' the reducer reads' if what else ''}; "
            "call tmcore.remove(model) before model.set_attn_implementation(...), then apply again ('sdpa' and "
            "'eager' are supported)"
        )
