"""The runtime: the per-patch link between a patched model's modules and the current forward's
token state. It drives a reducer over a state, so it imports `tmcore.reducer` and `tmcore.state`
and neither imports it: plan -> tracing -> state -> reducer -> runtime -> adapter -> api."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from tmcore.errors import InvalidInputError, PluginError, TmcoreError, UnsupportedModelError
from tmcore.plan import (
    Plan,
    carry_through,
    compose_source,
    destinations,
    identity_source,
    plan_problems,
    plan_value_problems,
    slot_positions,
    spread,
    unit_sizes,
)
from tmcore.reducer import INPUTS, SUBLAYERS, ModelInfo, TokenReducer
from tmcore.state import BlockScope, Carried, LayerInputs, TokenState, log_size_bias
from tmcore.tracing import Trace

__all__ = ["Runtime", "check_plans", "attention_dtype", "block_grid"]

_check_values = os.environ.get("TMCORE_CHECK_PLANS", "") not in ("", "0")


def check_plans(enabled: bool = True) -> bool:
    """Check the values of every plan a reducer returns (a debugging aid for reducer authors);
    returns whether the checks were on before, so a caller can restore them.

    The runtime always checks what a plan's types and shapes tell (`tmcore.plan.plan_problems`,
    no host synchronisation). With this on, it also reads the values
    (`tmcore.plan.plan_value_problems`: indices in range, no token twice, the protected prefix
    in place, padding last, weights finite and positive), one host synchronisation per block, and
    raises `tmcore.PluginError` naming the reducer, the block and the field. Off by default;
    ``TMCORE_CHECK_PLANS=1`` in the environment turns it on at import. The conformance suite
    runs every reducer with it on.
    """
    global _check_values
    previous, _check_values = _check_values, bool(enabled)
    return previous


class Runtime:
    """The per-patch link between a model's patched modules and the current forward's state.

    Adapters run each block through `run_block` (the block protocol: ``enter``, ``step`` where the
    reducer's `position` is ``start``, the bias, the attention sub-layer, ``step`` where it is
    ``attention``, the MLP sub-layer, ``step`` where it is ``layer``, ``exit``); hooks call
    ``capture``. The model's forward is bracketed by `begin` / `end` (in the forward
    `tmcore.Adapter.patch` binds on the adapter's ``forward_scope``): the state of one forward
    lives in a slot that `begin` opens on this thread's stack of forwards and `end` closes, so
    threads never see each other's state,
    a forward run inside another (a hook that calls the model) gets its own, nothing per forward is
    stored on a module, and ``torch.compile(model, fullgraph=True)`` traces it all (a
    ``threading.local`` is plain Python to dynamo, where context variables break the graph).
    What block ``l`` can ever read is ``layer_needs[l]`` (the reducer's `needs`, asked once
    here): adapters install capture hooks for it, nothing where the reducer does nothing, so those
    blocks keep the backbone's fused attention. What it reads in the current forward is
    `block_needs` (a subset): a reducer whose decisions depend on learned state (LTMP's
    thresholds) narrows it per forward with ``live_needs()``, e.g. to keep fused attention in
    blocks whose thresholds cannot fire.

    Padding: block 0 takes the input's padding mask (``valid`` ``[B, N]``, real tokens first in
    every sample). It travels through every Plan (``Plan.valid``); reducers keep padding out of
    their matching and scores (the core's matching functions take ``valid``), attention never
    attends to it (``TokenState.attn_bias``), and pooling weighs it 0. A reducer whose plan drops
    the validity of a padded batch is an error, not a silent mix of padding and real tokens.

    ``full_length``: the last block's `exit` brings the tokens back to the input length through
    the source map (each input position gets its group's value, pruned positions zeros), so
    token-level heads keep working; the state's sizes and validity are reset to the input's.

    ``live_needs() -> tuple[frozenset[str], ...]`` (optional): one entry per block, each a subset
    of ``layer_needs[l]``, asked when block 0 opens an inference forward (not under a soft mask).
    The reducer caches it (return the same tuple while its state is unchanged: the runtime checks
    a new tuple once, then trusts it by identity).

    Gradient checkpointing: a checkpointed block runs again in the backward pass, after the
    forward's state is gone. So in training mode ``enter`` keeps, for each block input tensor
    while it is alive, the state the block started from; a block entered again with the same
    input during a backward pass (the recomputation) replays from that state, without touching
    the trace. Nothing is kept in eval mode.

    Dense outputs (`dense_outputs`): every block's output comes back at the input length (the
    source map spreads each slot over its positions), so feature taps between blocks (timm's
    ``forward_intermediates``) see full maps; the next block takes its reduced tokens back
    (`compact`) and computes exactly as without.

    Soft-mask mode: when the model is in training mode and the reducer defines
    ``soft_step(layer, x, inputs, state) -> x``, block 0 opens the state with ``mask`` all ones;
    adapters then run attention through `TokenState.attn_probs`, and `step` calls ``soft_step``
    (which updates ``state.mask`` / ``state.size`` and removes nothing) instead of
    score / match / reduce.

    Block scope (`tmcore.ModelInfo.scope` ``"block"``: diffusion models, whose convolutions need
    every spatial token between blocks): an adapter brackets each block with `open_block` /
    `close_block` and each of its sub-layers with `merge` / `unmerge`: the plan is computed once
    per block from its input, the sub-layers the reducer names (``sublayers``: ``attn``,
    ``cross_attn``, ``mlp``) run on the merged tokens, and each output is spread back to every
    token of its group before the residual add, so the block hands back as many tokens as it got.
    """

    def __init__(self, reducer: TokenReducer, info: ModelInfo, full_length: bool = False) -> None:
        self.reducer = reducer
        self.info = info
        self.full_length = full_length
        self.position: str = reducer.position
        self.soft = callable(getattr(reducer, "soft_step", None))
        self.layer_needs: tuple[frozenset[str], ...] = tuple(
            _checked_needs(reducer, layer) for layer in range(info.num_layers)
        )
        self.live = callable(getattr(reducer, "live_needs", None))
        self.sublayers: frozenset[str] = _checked_sublayers(reducer) if info.scope == "block" else frozenset()
        self._live_checked: tuple[frozenset[str], ...] | None = None
        self._entered: dict[tuple[Any, ...], tuple[weakref.ref, TokenState]] = {}
        self._local = _Forwards()

    def __reduce__(self) -> tuple[Any, ...]:  # a thread-local does not pickle or deepcopy: make a new one
        return (type(self), (self.reducer, self.info, self.full_length))

    # -- one forward: its slot on this thread's stack ----------------------------------------------

    def begin(self, valid: Tensor | None = None, grid: tuple[int, int] | None = None) -> None:
        """A forward of the model starts (its forward pre-hook): open its slot. ``valid`` is the
        input's ``[B, N]`` padding mask, which block 0 takes (``None``: every token is real);
        ``grid`` the ``(height, width)`` of the input's finest token grid (block scope: each
        block's grid follows from it and its token count, `block_grid`)."""
        self._local.forwards.append(_Forward(valid, began=True, grid=grid))

    def end(self) -> None:
        """The forward `begin` opened ends (its forward hook, also when it raised): close its slot."""
        if self._local.forwards:
            self._local.forwards.pop()

    def _slot(self) -> _Forward:
        """The current forward's slot; blocks run without the model's forward (timm's
        ``forward_features``, a layer called directly) share one that stays open, so that a later
        call reuses it instead of piling up."""
        forwards = self._local.forwards
        if not forwards:
            forwards.append(_Forward(None, began=False))
        return forwards[-1]

    def in_forward(self) -> bool:
        """Whether the current blocks run inside the model's forward (`begin` opened their slot)."""
        forwards = self._local.forwards
        return bool(forwards) and forwards[-1].began

    def current(self) -> TokenState | None:
        forwards = self._local.forwards
        return forwards[-1].state if forwards else None

    def clear(self) -> None:
        if self._local.forwards:
            self._local.forwards[-1].state = None

    def capture(self, name: str, tensor: Tensor) -> None:
        state = self.current()
        if state is not None:
            state.captured[name] = tensor

    def enter(self, layer: int, x: Tensor, training: bool = False, valid: Tensor | None = None) -> TokenState:
        """Start of block ``layer``; block 0 opens a fresh state for this forward (with a soft
        mask when ``training`` and the reducer has a ``soft_step``).

        Args:
            layer: the block's index.
            x: ``[B, N, C]`` tokens entering the block.
            training: the block's training flag.
            valid: block 0 only: ``[B, N]`` padding mask of the input (``True`` / 1 on real
                tokens, which must come first in every sample), ``None`` when every token is real;
                default: the mask the forward's `begin` got.
        """
        remember = training and not torch.compiler.is_compiling()
        if remember and self._entered and _in_backward():
            replay = self._replay(layer, x)
            if replay is not None:
                return replay
        slot = self._slot()
        state = slot.state
        if layer == 0 or state is None:
            local = self._local
            trace = local.trace
            state = TokenState(self.info.num_protected, x.shape[1], self.reducer.prop_attn, trace)
            state.first_sample = local.first_sample
            state.grid = slot.grid
            valid = valid if valid is not None else slot.valid
            if valid is not None:
                state.valid = _padding_mask(valid, x)
            if training and self.soft:
                state.mask_eps = getattr(self.reducer, "mask_eps", state.mask_eps)
                state.mask_self_loop = getattr(self.reducer, "mask_self_loop", False)
                state.mask = x.new_ones(x.shape[0], x.shape[1])
                if state.valid is not None:
                    state.mask = state.mask * state.valid
            if trace is not None:
                trace.reset()
            if self.live and state.mask is None:
                state.needs = self._live_needs()
            if state.mask is None and (trace is not None or self.full_length or local.dense):
                state.source = identity_source(x.shape[0], x.shape[1], x.device)
            state.input_valid = state.valid
            slot.state = state
        if state.trace is not None:
            state.trace.token_counts.append(state.count(x))
        if remember:
            self._remember(layer, x, state)
        return state

    def _remember(self, layer: int, x: Tensor, state: TokenState) -> None:
        key = _entry_key(layer, x)
        entered = self._entered
        entered[key] = (weakref.ref(x, lambda _: entered.pop(key, None)), state.copy())

    def _replay(self, layer: int, x: Tensor) -> TokenState | None:
        """The state block ``layer`` started from when it last got ``x`` (a checkpoint's
        recomputation in the backward pass), as this context's current state; else ``None``."""
        entry = self._entered.get(_entry_key(layer, x))
        if entry is None or entry[0]() is None:
            return None
        state = entry[1].copy()
        if state.mask is not None and layer > 0 and not state.mask.requires_grad and torch.is_grad_enabled():
            # the forward ran without a graph (reentrant checkpointing): the mask's gradient to the
            # earlier blocks' learned parameters is gone
            raise UnsupportedModelError(
                f"reducer {self.reducer.name!r} trains through soft masks that flow from block to block "
                "outside the blocks' inputs, which reentrant gradient checkpointing (use_reentrant=True) cuts; "
                "use non-reentrant checkpointing: timm.layers.set_reentrant_ckpt(False), or "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
            )
        self._slot().state = state
        return state

    @contextmanager
    def numbered_from(self, first: int) -> Iterator[None]:
        """Inside the ``with`` block, forwards number their samples from ``first``
        (`TokenState.sample_index`): run sample ``i`` of a batch alone inside ``numbered_from(i)``
        and a stochastic reducer draws for it what it drew in the batch."""
        local = self._local
        previous, local.first_sample = local.first_sample, first
        try:
            yield
        finally:
            local.first_sample = previous

    @contextmanager
    def tracing(self, record: Trace) -> Iterator[Trace]:
        """Inside the ``with`` block, forwards on this thread record into ``record``
        (`tmcore.trace`)."""
        local = self._local
        previous, local.trace = local.trace, record
        try:
            yield record
        finally:
            local.trace = previous

    @contextmanager
    def dense_outputs(self) -> Iterator[None]:
        """Inside the ``with`` block, every block's output comes back at the input length (pruned
        positions zeros): for callers that read the token stream between blocks (timm's
        ``forward_intermediates``) and are not the model's ``forward`` (so this opens and closes
        their forward). `run_block` calls `compact` after `enter`."""
        local = self._local
        previous, local.dense = local.dense, True
        self.begin()
        try:
            yield
        finally:
            self.end()
            local.dense = previous

    def compact(self, x: Tensor, state: TokenState) -> Tensor:
        """The block's reduced tokens: ``x`` unless the previous block spread them to the input
        length (`dense_outputs`), then one gather takes one position per slot back."""
        if state.expanded is None:
            return x
        index = slot_positions(state.source, state.expanded)
        state.expanded = None
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def block_needs(self, layer: int, state: TokenState) -> frozenset[str]:
        """What block ``layer`` reads in ``state``'s forward: the reducer's ``live_needs()`` entry
        when it has one, else ``layer_needs[layer]``. Adapters capture and compute only this."""
        return self.layer_needs[layer] if state.needs is None else state.needs[layer]

    def _live_needs(self) -> tuple[frozenset[str], ...]:
        live = self.reducer.live_needs()  # type: ignore[attr-defined]
        if live is self._live_checked:
            return live
        if len(live) != len(self.layer_needs) or not all(a <= b for a, b in zip(live, self.layer_needs)):
            raise PluginError(
                f"reducer {self.reducer.name!r}: live_needs() returned {[sorted(n) for n in live]}, which must be "
                f"one subset of needs(layer) per block ({[sorted(n) for n in self.layer_needs]}): the adapter "
                "captures only what needs(layer) declared when the model was patched"
            )
        self._live_checked = live
        return live

    def run_block(
        self,
        layer: int,
        x: Tensor,
        attend: Callable[[Tensor, Tensor | None, TokenState], Tensor],
        feed_forward: Callable[[Tensor], Tensor],
        scale: float,
        training: bool = False,
        valid: Tensor | None = None,
        probe: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """Block ``layer`` with the token reduction: the block protocol every adapter fills.

        ``enter`` (block 0 opens the forward's state), ``compact`` (dense outputs), `step` where
        the reducer's `position` is ``start``, the bias (``log(size)`` and padding, in the
        attention's dtype), ``attend``, `step` where it is ``attention``, ``feed_forward``, `step`
        where it is ``layer``, ``exit``.

        Position ``start`` (MCTF's one-step-ahead attention) reduces the block's input ``x``
        before its attention. Where the block reads ``keys``, ``cls_attn`` or ``attn``, ``probe``
        gives this block's q and k of the unreduced ``x`` (the scores then read the attention
        this block would compute, with the bias of the current sizes); ``values`` are not offered
        there. The reducer may set ``state.given_attn`` (``[B, H, M, M]`` probabilities for the
        reduced tokens), which ``attend`` then uses in place of ``softmax(q k^T)``
        (`tmcore.adapter.explicit_attention`, values from the reduced tokens); it is cleared
        after ``attend``.

        Args:
            layer: the block's index.
            x: ``[B, N, C]`` tokens entering the block.
            attend: ``(x, bias, state) -> x`` after the attention sub-layer, its residual and norm
                included; the attention takes ``bias`` ``[B, 1, 1, N]`` (or ``None``) as its additive
                mask, fused unless `tmcore.adapter.needs_explicit_attention`.
            feed_forward: ``x -> x`` after the MLP sub-layer, residual and norm included.
            scale: the attention's logit scale (for attention-based scores).
            training: the block's training flag.
            valid: block 0 only: the input's padding mask when the forward's `begin` did not get it.
            probe: adapters that offer position ``start``: ``x -> (q, k)``, ``[B, H, N, d]`` each,
                from the block input exactly as the attention computes them (norm, projection,
                q / k norm included), without running the attention.

        Returns:
            The block's output ``[B, M, C]``.
        """
        state = self.enter(layer, x, training, valid)
        x = self.compact(x, state)
        start = self.position == "start"
        if start:
            x = self._step_at_start(layer, x, state, probe, scale)
        bias = state.attn_bias(attention_dtype(x))
        x = attend(x, bias, state)
        if start:  # what the attention captured (or was given) belongs to this block only
            state.given_attn, state.captured = None, {}
        if self.position == "attention":
            x = self.step(layer, x, state, bias, scale)
        x = feed_forward(x)
        if self.position == "layer":
            x = self.step(layer, x, state, bias, scale)
        return self.exit(layer, x, state)

    def _step_at_start(
        self,
        layer: int,
        x: Tensor,
        state: TokenState,
        probe: Callable[[Tensor], tuple[Tensor, Tensor]] | None,
        scale: float,
    ) -> Tensor:
        """`step` on the block's input, with q / k from ``probe`` where the block reads attention."""
        if self.block_needs(layer, state) & {"keys", "cls_attn", "attn"}:
            if probe is None:
                raise PluginError(
                    f"reducer {self.reducer.name!r} reduces at position 'start' and reads this block's attention, "
                    f"but the adapter gave run_block no probe for block {layer}'s q / k"
                )
            q, k = probe(x)
            state.captured = {"q": q, "k": k}
        return self.step(layer, x, state, state.attn_bias(attention_dtype(x)), scale)

    # -- block scope: merge -> compute -> unmerge inside each block ------------------------------------

    def open_block(self, layer: int, x: Tensor, training: bool = False) -> TokenState:
        """Start of block ``layer`` of a block-scope model: ``x`` ``[B, N, C]`` is the block's
        input (the metric of reducers that read the tokens); its grid comes from the forward's
        (`begin`) and ``N`` (`block_grid`). The plan is computed at the block's first `merge`."""
        state = self.enter(layer, x, training)
        grid = block_grid(state.grid, x.shape[1])
        state.block = BlockScope(x, None if grid is None else grid[:2], 1 if grid is None else grid[2])
        return state

    def merge(
        self,
        layer: int,
        sublayer: str,
        h: Tensor,
        keys: Callable[[Tensor], Tensor] | None = None,
        scale: float = 1.0,
    ) -> tuple[Tensor, Tensor | None]:
        """The merged input of one sub-layer of an open block (`open_block`).

        Args:
            layer: the block's index.
            sublayer: ``attn`` (self-attention), ``cross_attn`` (its queries) or ``mlp``.
            h: ``[B, N, C]`` the sub-layer's input (normalised, as the block computes it).
            keys: the block's first sub-layer: ``h -> [B, H, N, d]``, the self-attention's keys
                of ``h``, for reducers that read ``keys`` (ToMe's metric).
            scale: the self-attention's logit scale.

        Returns:
            ``([B, M, C] merged input, [B, 1, 1, M] additive attention bias or None)``: ``h`` and
            ``None`` where the block or this sub-layer merges nothing; the bias is ``log(size)``
            for a reducer with proportional attention, on ``attn`` only.
        """
        state = self.current()
        scope = state.block if state is not None else None
        if scope is None:
            raise TmcoreError(
                f"block {layer}'s {sublayer} ran outside its block (the adapter called merge before open_block)"
            )
        if not scope.planned:
            self._plan_block(layer, state, scope, h, keys, scale)
        plan = scope.plan
        if plan is None or sublayer not in self.sublayers:
            return h, None
        if h.shape[1] != plan.num_in:
            raise TmcoreError(
                f"block {layer}'s {sublayer} got {h.shape[1]} tokens, but the block's plan merges {plan.num_in}; "
                "a sub-layer called on part of the tokens (feed-forward chunking along the tokens) cannot be "
                "merged: turn chunking off (block.set_chunk_feed_forward(None)) or leave that sub-layer out"
            )
        y, size = self.reducer.reduce(h, plan, state)
        if sublayer != "attn" or not self.reducer.prop_attn or size is None:
            return y, None
        return y, log_size_bias(size).to(attention_dtype(y))

    def unmerge(self, layer: int, sublayer: str, y: Tensor) -> Tensor:
        """One sub-layer's output back on every token of the block: ``[B, M, C]`` -> ``[B, N, C]``,
        each token gets its group's value (``y`` itself where the sub-layer merged nothing)."""
        scope = self.current().block
        if scope.plan is None or sublayer not in self.sublayers:
            return y
        return spread(y, scope.destination, pruned=False)

    def _plan_block(
        self,
        layer: int,
        state: TokenState,
        scope: BlockScope,
        h: Tensor,
        keys: Callable[[Tensor], Tensor] | None,
        scale: float,
    ) -> None:
        scope.planned = True
        needs = self.block_needs(layer, state)
        captured = {}
        if "keys" in needs:
            if keys is None:
                raise PluginError(
                    f"reducer {self.reducer.name!r} reads keys in block {layer}, but the adapter gave merge no keys"
                )
            captured["k"] = keys(h)
        with _profiled("tmcore::reduce"):
            inputs = LayerInputs(captured, None, scale, needs, scope.tokens)
            plan = self.reducer.match(layer, self.reducer.score(layer, inputs, state), state)
        x = scope.tokens
        count = x.shape[1]
        if plan is not None:
            self._check_plan(layer, plan, x, state)
            if plan.keep.shape[1] + plan.src.shape[1] != plan.num_in or plan.valid is not None:
                raise PluginError(
                    f"reducer {self.reducer.name!r} returned a plan for block {layer} that does not place every one "
                    f"of its {plan.num_in} tokens (keep {plan.keep.shape[1]} + src {plan.src.shape[1]}): in block "
                    "scope every token gets its group's output back, so a plan must merge, not drop or pad"
                )
            if _check_values and plan.src.shape[1] and bool((plan.src_dst < 0).any()):
                raise PluginError(
                    f"reducer {self.reducer.name!r} returned a plan for block {layer} that drops tokens (Plan.src_dst "
                    "= -1); in block scope every token gets its group's output back, so a plan must merge"
                )
            scope.plan, scope.destination, count = plan, destinations(plan), plan.num_out
        trace = state.trace
        if trace is not None:
            trace.merged_counts.append(count)
            trace.groups.append(scope.destination)

    def close_block(self, layer: int, x: Tensor, state: TokenState) -> Tensor:
        """End of block ``layer`` of a block-scope model: returns the block's output ``x``."""
        scope = state.block
        if scope is not None and not scope.planned and state.trace is not None:  # no sub-layer merged
            state.trace.merged_counts.append(x.shape[1])
            state.trace.groups.append(None)
        state.block = None
        return self.exit(layer, x, state)

    def step(self, layer: int, x: Tensor, state: TokenState, bias: Tensor | None, scale: float) -> Tensor:
        """Score, match and reduce ``x`` ``[B, N, C]`` at the reducer's position in block ``layer``.

        ``bias`` and ``scale`` are what this block's attention used (at ``start``: what it would
        use on the unreduced tokens), for attention-based scores.
        """
        with _profiled("tmcore::reduce"):
            inputs = LayerInputs(state.captured, bias, scale, self.block_needs(layer, state), x)
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
            self._check_plan(layer, plan, x, state)
            try:
                x, size = reducer.reduce(x, plan, state)
                if state.source is not None:
                    state.source = compose_source(state.source, plan)
            except (IndexError, RuntimeError) as exc:  # an index the checks above cannot see (values)
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                raise PluginError(
                    f"reducer {reducer.name!r} failed to apply its plan in block {layer} ({type(exc).__name__}: "
                    f"{exc}); tmcore.check_plans() (TMCORE_CHECK_PLANS=1) says what is wrong with the plan"
                ) from exc
            if state.carried:
                state.carried = {
                    name: Carried(carry_through(c.tensor, plan, c.rule), c.rule) for name, c in state.carried.items()
                }
            if plan.valid is not None and size is not None:
                # padding slots: size 1 (finite log, no division by zero); valid masks them out
                size = size.masked_fill(~plan.valid.unsqueeze(-1), 1)
            state.size, state.valid = size, plan.valid  # the plan's output validity replaces the state's
            return x

    def _check_plan(self, layer: int, plan: Plan, x: Tensor, state: TokenState) -> None:
        """Refuse a plan that cannot be applied to ``x`` (types and shapes, always; values under
        `check_plans`), and one that drops the padding of a padded batch."""
        problems = plan_problems(plan, x.shape[0], x.shape[1], state.num_protected, x.device)
        if not problems and state.valid is not None and plan.valid is None:
            raise TmcoreError(
                f"reducer {self.reducer.name!r} returned a plan without validity (Plan.valid) for a padded batch "
                f"in block {layer}, so padding could merge with real tokens; it does not support padded "
                "inputs (pass state.valid to the core's matching functions, or run one sample at a time)"
            )
        if not problems and _check_values:
            problems = plan_value_problems(plan, state.num_protected, state.valid)
        if problems:
            raise PluginError(
                f"reducer {self.reducer.name!r} returned an invalid plan in block {layer}: " + "; ".join(problems)
            )

    def exit(self, layer: int, x: Tensor, state: TokenState) -> Tensor:
        """End of block ``layer``; returns the block's output. The last block completes an active
        trace and, with ``full_length``, brings ``x`` back to the input length (every block does
        under `dense_outputs`)."""
        last = layer == self.info.num_layers - 1
        if last and state.trace is not None:
            sizes = state.size if state.size is not None else unit_sizes(x)
            state.trace.finish(state.count(x), sizes, state.source, state.valid)
        if state.source is None or not (self._local.dense or (last and self.full_length)):
            return x
        num_slots = x.shape[1]
        x = spread(x, state.source)
        if last:
            state.size, state.valid = None, state.input_valid
        else:
            state.expanded = num_slots
        return x


class _Forward:
    """One forward's slot: its input padding mask (for block 0) and, from block 0 on, its state."""

    __slots__ = ("valid", "began", "grid", "state")

    def __init__(self, valid: Tensor | None, began: bool, grid: tuple[int, int] | None = None) -> None:
        self.valid = valid
        self.began = began
        self.grid = grid
        self.state: TokenState | None = None


class _Forwards(threading.local):
    """One thread's forwards through a patch (a stack: a forward may run inside another) and the
    options its caller set around them (`Runtime.tracing`, `numbered_from`, `dense_outputs`)."""

    def __init__(self) -> None:
        self.forwards: list[_Forward] = []
        self.trace: Trace | None = None
        self.first_sample = 0
        self.dense = False


def block_grid(grid: tuple[int, int] | None, num_tokens: int) -> tuple[int, int, int] | None:
    """A block's token grid from the model's finest one (ToMe for SD's rule): the block is
    ``ds = ceil(sqrt(H W // N))`` times coarser, its grid ``ceil(H / ds) x ceil(W / ds)`` (what
    stride-2 convolutions with padding 1 give).

    Args:
        grid: ``(H, W)`` the finest token grid of this forward's input, or ``None``.
        num_tokens: ``N``, the block's tokens.

    Returns:
        ``(h, w, ds)``, or ``None`` without a grid or where ``h * w != N`` (no grid fits the block).
    """
    if grid is None or num_tokens <= 0:
        return None
    height, width = grid
    ds = math.ceil(math.sqrt((height * width) // num_tokens)) if num_tokens <= height * width else 1
    h, w = math.ceil(height / ds), math.ceil(width / ds)
    return (h, w, ds) if h * w == num_tokens else None


def attention_dtype(x: Tensor) -> torch.dtype:
    """The dtype q / k will have inside attention under autocast (a float mask must match it)."""
    device = x.device.type
    if device != "meta" and torch.is_autocast_enabled(device):  # meta has no autocast (shape-only runs)
        return torch.get_autocast_dtype(device)
    return x.dtype


def _profiled(name: str) -> contextlib.AbstractContextManager:
    """A profiler range around eager code; nothing under ``torch.compile`` (dynamo drops it)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else torch.profiler.record_function(name)


def _in_backward() -> bool:
    """Whether autograd is running a backward pass here (where checkpoints recompute blocks);
    ``True`` where torch cannot tell."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is None or task() != -1


def _entry_key(layer: int, x: Tensor) -> tuple[Any, ...]:
    # the memory, not the object: reentrant checkpointing recomputes from a detached alias
    return (layer, x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride(), x.device)


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


def _checked_sublayers(reducer: TokenReducer) -> frozenset[str]:
    sublayers = frozenset(getattr(reducer, "sublayers", frozenset({"attn"})))
    if not sublayers <= SUBLAYERS:
        raise PluginError(
            f"reducer {reducer.name!r} merges around sub-layers {sorted(sublayers - SUBLAYERS)}, which do not exist; "
            f"`sublayers` must be a subset of {sorted(SUBLAYERS)}"
        )
    return sublayers


_LEFT_PADDING = (
    "the attention mask has padding before real tokens (left padding); token reduction needs the real "
    "tokens first in every sample: tokenize with padding_side='right'"
)


def _padding_mask(valid: Tensor, x: Tensor) -> Tensor:
    """An input padding mask as ``[B, N]`` bool on the tokens' device; refuses masks of the wrong
    shape, and left padding (real tokens must come first) without a host synchronisation: a
    device-side assertion, which raises here on the CPU and fails the forward on a GPU.

    A mask with no padding at all still takes the padded path (telling would need a sync): pass
    ``attention_mask=None`` for a batch without padding to keep the fixed-count fast path."""
    if valid.shape != x.shape[:2]:
        raise InvalidInputError(
            f"padding mask of shape {tuple(valid.shape)} for tokens of shape {tuple(x.shape)}; "
            f"allowed: [batch, tokens] = {tuple(x.shape[:2])}"
        )
    valid = valid.to(device=x.device, dtype=torch.bool)
    left_padded = (valid[:, 1:] & ~valid[:, :-1]).any()
    try:
        torch._assert_async(~left_padded, f"tmcore: {_LEFT_PADDING}")
    except RuntimeError:  # eager on the CPU: the assertion ran here
        raise TmcoreError(_LEFT_PADDING) from None
    return valid
