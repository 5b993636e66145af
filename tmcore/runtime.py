"""The runtime: the per-patch link between a patched model's modules and the current forward's
token state. It sits above `tmcore.reducer` and `tmcore.state` (it drives a reducer over a state),
so imports run one way: plan, tracing -> state -> reducer -> runtime -> adapter, api."""

from __future__ import annotations

import itertools
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

from tmcore.errors import PluginError
from tmcore.plan import compose_source, identity_source
from tmcore.reducer import INPUTS, ModelInfo, TokenReducer
from tmcore.state import LayerInputs, TokenState
from tmcore.tracing import Trace

__all__ = ["Runtime"]

_ids = itertools.count()


class Runtime:
    """The per-patch link between a model's patched modules and the current forward's state.

    Adapters call, in each block: ``enter(layer, x, training)`` first,
    ``step(layer, x, state, bias, scale)`` between attention and MLP, ``exit(layer, x, state)``
    last; hooks call ``capture``. What to capture and compute in block ``l`` is
    ``layer_needs[l]`` (the reducer's `needs`, asked once here): nothing where the reducer does
    nothing, so those blocks keep the backbone's fused attention and install no hooks.

    Soft-mask mode: when the model is in training mode and the reducer defines
    ``soft_step(layer, x, inputs, state) -> x``, block 0 opens the state with ``mask`` all ones;
    adapters then run attention through `TokenState.attn_probs`, and `step` calls ``soft_step``
    (which updates ``state.mask`` / ``state.size`` and removes nothing) instead of
    score / match / reduce.
    """

    def __init__(self, reducer: TokenReducer, info: ModelInfo) -> None:
        self.reducer = reducer
        self.info = info
        self.soft = callable(getattr(reducer, "soft_step", None))
        self.layer_needs: tuple[frozenset[str], ...] = tuple(
            _checked_needs(reducer, layer) for layer in range(info.num_layers)
        )
        uid = next(_ids)
        self._state: ContextVar[TokenState | None] = ContextVar(f"tmcore_state_{uid}", default=None)
        self.trace_var: ContextVar[Trace | None] = ContextVar(f"tmcore_trace_{uid}", default=None)

    def __reduce__(self) -> tuple[Any, ...]:  # ContextVars do not pickle or deepcopy: make new ones
        return (type(self), (self.reducer, self.info))

    def current(self) -> TokenState | None:
        return self._state.get()

    def clear(self) -> None:
        self._state.set(None)

    def capture(self, name: str, tensor: Tensor) -> None:
        state = self._state.get()
        if state is not None:
            state.captured[name] = tensor

    def enter(self, layer: int, x: Tensor, training: bool = False) -> TokenState:
        """Start of block ``layer``; block 0 opens a fresh state for this forward (with a soft
        mask when ``training`` and the reducer has a ``soft_step``)."""
        state = self._state.get()
        if layer == 0 or state is None:
            trace = self.trace_var.get()
            state = TokenState(self.info.num_protected, x.shape[1], self.reducer.prop_attn, trace)
            if training and self.soft:
                state.mask = x.new_ones(x.shape[0], x.shape[1])
            if trace is not None:
                trace.masks = []
                if state.mask is None:
                    state.source = identity_source(x.shape[0], x.shape[1], x.device)
            self._state.set(state)
        if state.trace is not None:
            if layer == 0:
                state.trace.token_counts = []
            state.trace.token_counts.append(state.count(x))
        return state

    def step(self, layer: int, x: Tensor, state: TokenState, bias: Tensor | None, scale: float) -> Tensor:
        """Score, match and reduce ``x`` ``[B, N, C]`` after the attention of block ``layer``.

        ``bias`` and ``scale`` are what this block's attention used (for attention-based scores).
        """
        with torch.profiler.record_function("tmcore::reduce"):
            inputs = LayerInputs(state.captured, bias, scale, self.layer_needs[layer])
            reducer = self.reducer
            if state.mask is not None:
                x = reducer.soft_step(layer, x, inputs, state)  # type: ignore[attr-defined]
                state.captured = {}
                if state.trace is not None:
                    state.trace.masks.append(state.mask)
                return x
            plan = reducer.match(layer, reducer.score(layer, inputs, state), state)
            state.captured = {}
            if plan is None:
                return x
            x, size = reducer.reduce(x, plan, state)
            if plan.valid is not None and size is not None:
                # padding slots: size 1 (finite log, no division by zero); valid masks them out
                size = size.masked_fill(~plan.valid.unsqueeze(-1), 1)
            state.size, state.valid = size, plan.valid  # the plan's output validity replaces the state's
            if state.source is not None:
                state.source = compose_source(state.source, plan)
            return x

    def exit(self, layer: int, x: Tensor, state: TokenState) -> None:
        """End of block ``layer``; the last block completes an active trace."""
        if state.trace is not None and layer == self.info.num_layers - 1:
            trace = state.trace
            trace.token_counts.append(state.count(x))
            trace.sizes = state.size if state.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)
            trace.source = state.source
            trace.valid = state.valid


def _checked_needs(reducer: TokenReducer, layer: int) -> frozenset[str]:
    needs = frozenset(reducer.needs(layer))
    allowed = type(reducer).requires
    if not needs <= allowed:
        raise PluginError(
            f"reducer {reducer.name!r} says block {layer} needs {sorted(needs - allowed)}, which its class "
            f"attribute `requires` ({sorted(allowed)}) does not declare; `requires` must name every input "
            f"that `needs` can return (a subset of {sorted(INPUTS)})"
        )
    return needs
