"""Checks that a matching function treats a padded batch exactly as its samples one by one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tmcore.adapter import explicit_attention, needs_explicit_attention
from tmcore.plan import Plan, destinations, merge_tokens
from tmcore.reducer import ModelInfo, TokenReducer, validate_config
from tmcore.registry import registry
from tmcore.runtime import Runtime
from tmcore.state import LayerInputs, TokenState
from tmcore.tracing import Trace

__all__ = [
    "make_reducer",
    "assert_padded_equals_unpadded",
    "assert_blocks_equal_samples",
    "right_padding",
    "project_qkv",
    "layer_inputs",
    "padded_state",
    "block_matcher",
    "run_blocks",
]

HEADS = 2
"""Heads of the stand-in attention of `project_qkv` (token widths must divide by it)."""


def right_padding(lengths: list[int], n: int, device: torch.device | None = None) -> Tensor:
    """``[B, n]`` bool padding mask with the first ``lengths[i]`` tokens of sample ``i`` real."""
    return torch.arange(n, device=device) < torch.tensor(lengths, device=device).unsqueeze(1)


def assert_padded_equals_unpadded(
    match: Callable[[Tensor, Tensor | None], Plan], x: Tensor, valid: Tensor, size: Tensor | None = None
) -> None:
    """Assert that ``match(x, valid)`` on a padded batch gives every sample what
    ``match(x_i, None)`` gives it alone: the same tokens, sizes and order first, then only
    padding, and that no padding token joins a real token's group.

    Args:
        match: builds a Plan from ``[B, N, C]`` tokens and a padding mask (``None``: no padding).
        x: ``[B, N, C]`` tokens (the features the plan is applied to; pass the metric itself).
        valid: ``[B, N]`` bool, real tokens first.
        size: ``[B, N, 1]`` token sizes, or ``None``.
    """
    plan = match(x, valid)
    assert plan.valid is not None, "a padded batch must give a plan with validity"
    merged, merged_size = merge_tokens(x, plan, size)
    dest = destinations(plan)
    for i, n_i in enumerate(valid.sum(1).tolist()):
        alone = match(x[i : i + 1, :n_i], None)
        ref, ref_size = merge_tokens(x[i : i + 1, :n_i], alone, None if size is None else size[i : i + 1, :n_i])
        m_i = ref.shape[1]
        assert int(plan.valid[i].sum()) == m_i, f"sample {i}: {int(plan.valid[i].sum())} tokens, alone {m_i}"
        assert plan.valid[i, :m_i].all(), f"sample {i}: padding before real tokens"
        torch.testing.assert_close(merged[i, :m_i], ref[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merged_size[i, :m_i], ref_size[0], rtol=0, atol=0)
        pad_dest = dest[i, n_i:]
        assert not (pad_dest[pad_dest >= 0] < m_i).any(), f"sample {i}: a padding token joined a real token"


def project_qkv(x: Tensor, heads: int = HEADS) -> tuple[Tensor, Tensor, Tensor]:
    """A stand-in attention's q, k, v ``[B, H, N, C / H]``: fixed random projections of each
    token of ``x`` ``[B, N, C]``, so a sample's tokens get the same q, k, v padded and alone."""
    b, n, c = x.shape
    w = torch.randn(3, c, c, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    q, k, v = ((x @ w[i]).view(b, n, heads, c // heads).transpose(1, 2) for i in range(3))
    return q, k, v


def _scale(x: Tensor, heads: int) -> float:
    return (x.shape[-1] // heads) ** -0.5


def make_reducer(
    name: str,
    num_protected: int,
    num_layers: int = 1,
    num_tokens: int = 24,
    class_token: bool | None = None,
    pool: str = "token",
    **config: Any,
) -> TokenReducer:
    """The registered reducer ``name`` built from ``config`` (validated) for a stand-in model
    of ``num_layers`` blocks and ``num_tokens`` tokens with ``num_protected`` prefix tokens; it has a
    class token when ``num_protected > 0`` unless ``class_token`` says otherwise."""
    cls = registry.get_reducer(name).obj
    info = ModelInfo(
        family="test",
        num_layers=num_layers,
        num_tokens=num_tokens,
        num_protected=num_protected,
        class_token=num_protected > 0 if class_token is None else class_token,
        pool=pool,
    )
    return cls(validate_config(cls, config), info)


def layer_inputs(reducer: TokenReducer, layer: int, x: Tensor, state: TokenState, heads: int = HEADS) -> LayerInputs:
    """What block ``layer`` hands ``reducer`` for tokens ``x`` under ``state`` (its padding bias
    included), from `project_qkv`."""
    q, k, v = project_qkv(x, heads)
    bias = state.attn_bias(x.dtype)
    return LayerInputs({"q": q, "k": k, "v": v}, bias, _scale(x, heads), reducer.needs(layer), tokens=x)


def padded_state(reducer: TokenReducer, x: Tensor, valid: Tensor | None) -> TokenState:
    """The state block 0 of ``reducer`` sees for tokens ``x`` with padding mask ``valid``."""
    state = TokenState(reducer.info.num_protected, x.shape[1], prop_attn=reducer.prop_attn, trace=None)
    state.valid = valid
    return state


def block_matcher(
    reducer: TokenReducer, layer: int = 0, keys_only: bool = False
) -> Callable[[Tensor, Tensor | None], Plan]:
    """``match(x, valid)`` for `assert_padded_equals_unpadded`: block ``layer``'s score and match
    for tokens ``x`` (`layer_inputs` from them; with ``keys_only``, ``x`` itself is the head-mean
    keys); a block that keeps every token gives the identity plan."""

    def match(x: Tensor, valid: Tensor | None) -> Plan:
        b, n, _ = x.shape
        state = padded_state(reducer, x, valid)
        if keys_only:
            inputs = LayerInputs({"k": x.unsqueeze(1)}, None, 1.0, reducer.needs(layer), tokens=x)
        else:
            inputs = layer_inputs(reducer, layer, x, state)
        plan = reducer.match(layer, reducer.score(layer, inputs, state), state)
        return plan if plan is not None else Plan.prune(torch.arange(n).expand(b, n), n, valid)

    return match


def run_blocks(
    reducer: TokenReducer, x: Tensor, valid: Tensor | None = None, training: bool = False, heads: int = HEADS
) -> tuple[Tensor, TokenState, list[int | Tensor]]:
    """Every block of ``reducer.info`` through the core's `Runtime` as an adapter drives it, with
    `project_qkv` standing in for each block's attention (explicit probabilities where the block
    needs them or a soft mask is set; no MLP).

    Returns:
        ``(tokens after the last block, the final state, tokens entering each block then leaving
        the last)``.
    """
    rt = Runtime(reducer, reducer.info)
    scale = _scale(x, heads)

    def attend(x: Tensor, bias: Tensor | None, state: TokenState) -> Tensor:
        q, k, v = project_qkv(x, heads)
        for name, t in zip("qkv", (q, k, v)):
            rt.capture(name, t)
        if needs_explicit_attention(rt, layer, state):
            explicit_attention(q, k, v, scale, bias, state, rt)
        return x

    with rt.tracing(Trace()) as trace:
        for layer in range(reducer.info.num_layers):
            x = rt.run_block(layer, x, attend, lambda x: x, scale, training, valid if layer == 0 else None)
    state = rt.current()
    assert state is not None
    return x, state, trace.token_counts


def assert_blocks_equal_samples(
    reducer: TokenReducer, x: Tensor, lengths: list[int], training: bool = False
) -> tuple[TokenState, list[int | Tensor]]:
    """Assert that `run_blocks` on ``x`` right-padded to ``lengths`` gives every sample what it
    gives alone, unpadded: its features, sizes, soft mask and token count after every block.

    Returns:
        The padded run's final state and counts, for further checks.
    """
    with torch.no_grad():
        out, state, counts = run_blocks(reducer, x, right_padding(lengths, x.shape[1]), training)
        for i, n_i in enumerate(lengths):
            alone, alone_state, alone_counts = run_blocks(reducer, x[i : i + 1, :n_i], None, training)
            got = [int(c if isinstance(c, int) else c[i]) for c in counts]
            assert got == [int(c if isinstance(c, int) else c[0]) for c in alone_counts], f"sample {i}: counts"
            m_i = alone.shape[1]
            torch.testing.assert_close(out[i, :m_i], alone[0], rtol=1e-9, atol=1e-9)
            if alone_state.size is not None:
                torch.testing.assert_close(state.size[i, :m_i], alone_state.size[0], rtol=0, atol=0)
            if alone_state.mask is not None:
                torch.testing.assert_close(state.mask[i, :m_i], alone_state.mask[0], rtol=0, atol=0)
    return state, counts
