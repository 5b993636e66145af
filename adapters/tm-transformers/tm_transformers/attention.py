"""tmcore's attention function, registered in transformers' attention interface.

Every attention module of the families this adapter supports runs
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)``
with q, k, v ``[B, H, N, d]`` exactly as the attention uses them. A patched model's attention
config names ``tmcore_sdpa`` (or ``tmcore_eager``): the function registered under that name
hands q / k / v to the current forward's state (only what the block's reducer needs), computes
the attention with explicit probabilities where the reducer reads them, a soft mask must
enter the softmax or a reducer at position ``start`` handed the block its probabilities
(``state.given_attn``: the module's q and k are then computed but unused), and otherwise calls
the implementation
the user chose (``sdpa`` stays fused). The additive bias (``log(size)``, padding) arrives as the
module's own ``attention_mask`` argument: the patched layer forwards pass it there.

A module learns its block through a `Link` (runtime, layer) the adapter sets on it for the
duration of the patch; an attention module without one (another model sharing the config) or
called outside a patched forward runs the original implementation unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from tmcore import Runtime
from tmcore.adapter import explicit_attention, needs_explicit_attention

__all__ = ["LINK", "PREFIX", "WRAPPED", "Link", "implementation_name", "register", "tmcore_attention"]

PREFIX = "tmcore_"
"""Registered names are ``PREFIX + original``: the original stays known without extra state."""

WRAPPED = ("sdpa", "eager")
"""Implementations that take an additive float mask, so the bias can ride on ``attention_mask``."""

LINK = "_tmcore_link"
"""Instance attribute of a patched attention module: its `Link`."""

_NEEDS_K = frozenset({"keys", "cls_attn", "attn"})
_NEEDS_Q = frozenset({"cls_attn", "attn"})


class Link:
    """Which block of which patch an attention module belongs to (plain data: deep-copies)."""

    __slots__ = ("runtime", "layer")

    def __init__(self, runtime: Runtime, layer: int) -> None:
        self.runtime = runtime
        self.layer = layer

    def __reduce__(self) -> tuple[Any, ...]:
        return (Link, (self.runtime, self.layer))


def implementation_name(original: str | None) -> str:
    """``"sdpa"`` -> ``"tmcore_sdpa"``; ``None`` (transformers then falls back to eager) -> ``"tmcore_eager"``."""
    return PREFIX + (original or "eager")


def register() -> None:
    """Register ``tmcore_sdpa`` / ``tmcore_eager`` in transformers' attention interface, and the
    original's mask builder under the same name (so the model still builds its usual padding mask
    for any unpatched model that shares the config). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for original in WRAPPED:
        name = implementation_name(original)
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, partial(tmcore_attention, original))
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])


def tmcore_attention(
    original: str,
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The attention interface's function signature (``[B, H, N, d]`` in, ``[B, N, H, d]`` out,
    plus the probabilities or ``None``), with tmcore's captures and explicit path."""
    link = module.__dict__.get(LINK)
    state = None if link is None else link.runtime.current()
    if state is None:
        return _original(original, module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    runtime, layer = link.runtime, link.layer
    # at position start the reducer read q / k from the layout's probe, before this attention
    needs = runtime.block_needs(layer, state) if runtime.position != "start" else frozenset()
    if needs & _NEEDS_K:
        runtime.capture("k", key)
    if needs & _NEEDS_Q:
        runtime.capture("q", query)
    if "values" in needs:
        runtime.capture("v", value)
    if not needs_explicit_attention(runtime, layer, state):
        return _original(original, module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    # the module passes dropout > 0 only in training mode
    drop = partial(torch.nn.functional.dropout, p=dropout, training=True) if dropout > 0 else None
    out = explicit_attention(query, key, value, scale, attention_mask, state, runtime, drop)
    return out.transpose(1, 2).contiguous(), state.captured.get("attn")


def _original(original: str, module: nn.Module) -> Callable[..., tuple[Tensor, Tensor | None]]:
    """The implementation the user chose: the interface's ``sdpa`` (looked up per call, so a user's
    override of it is honoured), or the module's own ``eager_attention_forward``, as transformers
    resolves ``"eager"`` (the default the modeling file passes to ``get_interface``)."""
    if original != "eager":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS[original]
    return sys.modules[type(module).__module__].eager_attention_forward
