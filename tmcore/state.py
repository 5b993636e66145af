"""Per-forward token state and the runtime that links a patched model's modules to it.

The state lives for one forward call, in a ``ContextVar`` owned by the patch: it is never stored
on a module, so one patched model can run in several threads (each thread has its own context).
"""

from __future__ import annotations

import itertools
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tmcore.plan import compose_source, identity_source, source_matrix

if TYPE_CHECKING:
    from tmcore.reducer import ModelInfo, TokenReducer

__all__ = ["TokenState", "LayerInputs", "Trace", "Runtime", "masked_softmax", "MASK_EPS"]

MASK_EPS = 1e-5
"""The epsilon of `masked_softmax` (LTMP's value): keeps a row finite when the alive keys'
weights all underflow."""


def masked_softmax(logits: Tensor, mask: Tensor, eps: float = MASK_EPS) -> Tensor:
    """Softmax over keys where a soft keep-mask multiplies each key's weight (LTMP 4.4).

    ``p_ij = (e_ij * mask_j + eps / N) / (sum_j e_ij * mask_j + eps)`` with
    ``e_ij = exp(logit_ij - max_j logit_ij)``. The mask enters multiplicatively, so gradients
    reach whatever produced it (straight-through threshold masks); ``eps = 0`` is an exact
    masked softmax.

    Args:
        logits: ``[B, H, N, N]`` attention logits, biases (``log(size)``, ``-inf``) included.
        mask: ``[B, N]`` per-key weight in ``[0, 1]`` (1 alive, 0 removed).
        eps: stabiliser; rows whose alive keys all underflow become near-uniform, not NaN.

    Returns:
        ``[B, H, N, N]`` probabilities, in ``float32`` or wider.
    """
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp() * mask[:, None, None, :].to(logits.dtype)
    if eps == 0:
        return e / e.sum(dim=-1, keepdim=True)
    return (e + eps / e.shape[-1]) / (e.sum(dim=-1, keepdim=True) + eps)


_ids = itertools.count()


class Trace:
    """What one traced forward did; filled in by the last block.

    Attributes:
        token_counts: tokens entering each block, then the count leaving the last block; an int
            per entry, or a ``[B]`` long tensor where samples in the batch differ (ragged batches;
            alive tokens under a soft mask).
        sizes: ``[B, M, 1]`` final token sizes (how many input tokens each output token stands for).
        source: ``[B, N0]`` long, the output slot of every input token (``-1`` where pruned);
            ``None`` in soft-mask (training) mode, where tokens are masked, not moved.
        valid: ``[B, M]`` bool, ``False`` on the final padding slots of a ragged batch, or ``None``.
        masks: soft-mask mode only: the ``[B, N0]`` keep mask after each block, straight-through
            (gradients reach the reducer's learned parameters, e.g. for a FLOPs loss).
    """

    def __init__(self) -> None:
        self.token_counts: list[int | Tensor] = []
        self.sizes: Tensor | None = None
        self.source: Tensor | None = None
        self.valid: Tensor | None = None
        self.masks: list[Tensor] = []

    def source_matrix(self) -> Tensor:
        """ToMe's ``[B, M, N0]`` 0/1 matrix: row ``g`` marks the inputs merged into output ``g``."""
        if self.source is None or self.sizes is None:
            raise RuntimeError("no forward pass has run inside this trace yet")
        return source_matrix(self.source, self.sizes.shape[1])

    def unmerge(self, y: Tensor) -> Tensor:
        """Bring ``[B, M, C]`` output tokens back to the ``[B, N0, C]`` input layout.

        Each input position gets its group's value; pruned positions get zeros.
        """
        if self.source is None:
            raise RuntimeError("no forward pass has run inside this trace yet")
        idx = self.source.clamp(min=0).unsqueeze(-1).expand(-1, -1, y.shape[-1])
        return y.gather(1, idx).masked_fill(self.source.unsqueeze(-1) < 0, 0)


class TokenState:
    """Token bookkeeping for one forward pass.

    Attributes:
        size: ``[B, N, 1]`` tokens each slot stands for; ``None`` until the first reduction
            (padding slots of a ragged batch have size 1, so nothing divides by zero).
        valid: ``[B, N]`` bool, ``False`` on padding slots of ragged batches; ``None`` if none.
        mask: ``[B, N]`` float soft keep-mask (1 alive, 0 removed, straight-through values), set
            in training mode for reducers with a ``soft_step``; ``None`` otherwise. While it is
            set, adapters compute attention with `masked_softmax` and hand the probabilities
            over as ``captured["attn"]``.
        source: ``[B, N0]`` long source map, kept only while tracing.
        captured: tensors the adapter captured in the current layer (q, k, v, soft-mode attn).
        num_input: tokens entering the first block (schedules are defined from it).
    """

    __slots__ = ("size", "valid", "mask", "source", "captured", "prop_attn", "num_protected", "num_input", "trace")

    def __init__(self, num_protected: int, num_input: int, prop_attn: bool, trace: Trace | None) -> None:
        self.size: Tensor | None = None
        self.valid: Tensor | None = None
        self.mask: Tensor | None = None
        self.source: Tensor | None = None
        self.captured: dict[str, Tensor] = {}
        self.prop_attn = prop_attn
        self.num_protected = num_protected
        self.num_input = num_input
        self.trace = trace

    def attn_bias(self, dtype: torch.dtype) -> Tensor | None:
        """The additive attention bias ``[B, 1, 1, N]``: ``log(size)`` per key (proportional
        attention, when enabled) and ``-inf`` on invalid keys; ``None`` when there is none, so the
        backbone's fused attention runs exactly as unpatched."""
        bias = None
        if self.prop_attn and self.size is not None:
            # log in float32 at least (half sizes lose integers), in float64 for float64 models
            bias = self.size.to(torch.promote_types(self.size.dtype, torch.float32)).log().transpose(1, 2).unsqueeze(1)
        if self.valid is not None:
            invalid = (~self.valid).unsqueeze(1).unsqueeze(1)
            bias = bias if bias is not None else invalid.new_zeros(invalid.shape, dtype=torch.float32)
            bias = bias.masked_fill(invalid, float("-inf"))
        return None if bias is None else bias.to(dtype)

    def attn_probs(self, logits: Tensor) -> Tensor:
        """Soft-mask attention: `masked_softmax` of ``logits`` ``[B, H, N, N]`` (biases already
        added) under `mask`; the adapter's explicit attention path while `mask` is set."""
        if self.mask is None:
            raise RuntimeError("attn_probs needs a soft mask (training mode of a reducer with soft_step)")
        return masked_softmax(logits, self.mask)

    def count(self, x: Tensor) -> int | Tensor:
        """Tokens per sample of ``x``: an int, or a ``[B]`` long tensor for ragged batches and
        for alive tokens under a soft mask."""
        if self.mask is not None:
            return self.mask.detach().sum(1).round().long()
        return x.shape[1] if self.valid is None else self.valid.sum(1)


class LayerInputs:
    """What a reducer may read from one attention layer, computed only when asked for.

    Built from the q, k, v the adapter captured (each ``[B, H, N, d]``, exactly as the attention
    used them) and the attention bias. Names match ``TokenReducer.requires``:
    ``keys`` ``[B, N, d]`` head-mean keys; ``cls_attn`` ``[B, H, N]`` the class token's attention
    row (one query, no ``N x N`` matrix); ``attn`` ``[B, H, N, N]`` full attention probabilities
    (the adapter's own when it computed them explicitly, e.g. under a soft mask, else recomputed
    from q and k); ``values`` ``[B, H, N, d]``.
    """

    def __init__(self, captured: dict[str, Tensor], bias: Tensor | None, scale: float) -> None:
        self._c = captured
        self._bias = bias
        self._scale = scale
        self._cache: dict[str, Tensor] = {}

    def _get(self, name: str) -> Tensor:
        if name not in self._c:
            raise RuntimeError(f"the adapter did not capture {name!r}; declare it in the reducer's `requires`")
        return self._c[name]

    def _probs(self, q: Tensor) -> Tensor:
        logits = (q * self._scale) @ self._get("k").transpose(-1, -2)
        if self._bias is not None:
            logits = logits + self._bias.to(logits.dtype)
        return logits.softmax(dim=-1)

    @property
    def keys(self) -> Tensor:
        if "keys" not in self._cache:
            self._cache["keys"] = self._get("k").mean(dim=1)
        return self._cache["keys"]

    @property
    def cls_attn(self) -> Tensor:
        if "cls_attn" not in self._cache:
            self._cache["cls_attn"] = self._probs(self._get("q")[:, :, :1]).squeeze(2)
        return self._cache["cls_attn"]

    @property
    def attn(self) -> Tensor:
        if "attn" in self._c:
            return self._c["attn"]
        if "attn" not in self._cache:
            self._cache["attn"] = self._probs(self._get("q"))
        return self._cache["attn"]

    @property
    def values(self) -> Tensor:
        return self._get("v")


class Runtime:
    """The per-patch link between a model's patched modules and the current forward's state.

    Adapters call, in each block: ``enter(layer, x, training)`` first,
    ``step(layer, x, state, bias, scale)`` between attention and MLP, ``exit(layer, x, state)``
    last; hooks call ``capture``.

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
            inputs = LayerInputs(state.captured, bias, scale)
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
