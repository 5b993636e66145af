"""Per-forward token state, and what a reducer may read from one attention layer.

A `TokenState` lives for one forward call, in that forward's slot on a thread-local stack owned by
the patch's `tmcore.runtime.Runtime`: it is never stored on a module, so one patched model can run
in several threads at once, and a forward inside another gets its own. This module imports only
`tmcore.tracing`, a leaf.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor

from tmcore.tracing import Trace

if TYPE_CHECKING:
    from tmcore.plan import Plan

__all__ = [
    "TokenState",
    "LayerInputs",
    "BlockScope",
    "INPUTS",
    "Carried",
    "CarryRule",
    "class_logits",
    "log_size_bias",
    "masked_softmax",
    "MASK_EPS",
]

CarryRule = Literal["sum", "mean", "amax", "first"]


class Carried(NamedTuple):
    """A per-token tensor a reducer carries across blocks (`TokenState.carry`) and the rule that
    reduces it with each plan."""

    tensor: Tensor
    rule: CarryRule


INPUTS = frozenset({"keys", "cls_attn", "attn", "values"})
"""What a reducer may read from an attention layer (`LayerInputs`), by name: it declares them in
``requires`` and, per block, in ``needs(layer)``."""

MASK_EPS = 1e-5
"""The epsilon of `masked_softmax` (LTMP's value): keeps a row finite when the alive keys'
weights all underflow."""


def masked_softmax(logits: Tensor, mask: Tensor, eps: float = MASK_EPS, self_loop: bool = False) -> Tensor:
    """Softmax over keys where a soft keep-mask multiplies each key's weight (LTMP 4.4).

    ``p_ij = (e_ij * mask_j + eps / N) / (sum_j e_ij * mask_j + eps)`` with
    ``e_ij = exp(logit_ij - max_j logit_ij)``. The mask enters multiplicatively, so gradients
    reach whatever produced it (straight-through threshold masks); ``eps = 0`` is an exact
    masked softmax.

    Args:
        logits: ``[B, H, N, N]`` attention logits, biases (``log(size)``, padding) included.
        mask: ``[B, N]`` per-key weight in ``[0, 1]`` (1 alive, 0 removed).
        eps: stabiliser; rows whose alive keys all underflow become near-uniform, not NaN.
        self_loop: every query keeps its own key at weight 1 whatever its mask (DiffRate's
            ``softmax_with_policy``, with ``eps = 1e-6``); off by default (LTMP).

    Returns:
        ``[B, H, N, N]`` probabilities, in ``float32`` or wider.
    """
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    weight = mask[:, None, None, :].to(logits.dtype)
    if self_loop:
        eye = torch.eye(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        weight = weight + (1 - weight) * eye
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp() * weight
    if eps == 0:
        return e / e.sum(dim=-1, keepdim=True)
    return (e + eps / e.shape[-1]) / (e.sum(dim=-1, keepdim=True) + eps)


class BlockScope:
    """One block of a block-scope model (`tmcore.ModelInfo.scope` ``"block"``): the plan is
    computed once from the block's input and applied around its sub-layers, each of which runs on
    the merged tokens and hands back all of them (`tmcore.runtime.Runtime.open_block`).

    Attributes:
        tokens: ``[B, N, C]`` the block's input (the residual stream, before any norm).
        grid: ``(h, w)`` the block's token grid, row-major (``h * w == N``), or ``None`` where the
            adapter knows no 2-D layout.
        downsample: how many times coarser than the model's first grid this block's is (1, 2, 4, 8
            in a Stable Diffusion UNet; 1 in a diffusion transformer).
        plan: the block's Plan once computed (``None``: the block merges nothing).
        destination: ``[B, N]`` long, the merged slot of every token (`tmcore.plan.destinations`).
        planned: whether the plan has been computed (it is, at the first sub-layer).
    """

    __slots__ = ("tokens", "grid", "downsample", "plan", "destination", "planned")

    def __init__(self, tokens: Tensor, grid: tuple[int, int] | None, downsample: int) -> None:
        self.tokens = tokens
        self.grid = grid
        self.downsample = downsample
        self.plan: Plan | None = None
        self.destination: Tensor | None = None
        self.planned = False


class TokenState:
    """Token bookkeeping for one forward pass.

    Attributes:
        size: ``[B, N, 1]`` tokens each slot stands for; ``None`` until the first reduction
            (padding slots of a ragged batch have size 1, so nothing divides by zero).
        valid: ``[B, N]`` bool, ``False`` on padding (of the input, or slots of ragged plans),
            real tokens first in every sample; ``None`` when every token is real.
        input_valid: the input's padding mask, as block 0 received it.
        mask: ``[B, N]`` float soft keep-mask (1 alive, 0 removed, straight-through values), set
            in training mode for reducers with a ``soft_step``; ``None`` otherwise. While it is
            set, adapters compute attention with `masked_softmax` and hand the probabilities
            over as ``captured["attn"]``.
        source: ``[B, N0]`` long source map, kept only while tracing.
        captured: tensors the adapter captured in the current layer (q, k, v, soft-mode attn).
        num_input: tokens entering the first block (schedules are defined from it).
        needs: per block, what the reducer reads in this forward (its ``live_needs()``);
            ``None``: what it declared at patch time (`tmcore.runtime.Runtime.block_needs`).
        first_sample: the number of the batch's first sample (`sample_index`); 0 unless the
            caller runs part of a batch (`tmcore.runtime.Runtime.numbered_from`).
        expanded: dense outputs only (`tmcore.runtime.Runtime.dense_outputs`): the block
            output was brought back to the input length from this many slots, which the next
            block takes back (`tmcore.runtime.Runtime.compact`); ``None`` otherwise.
        carried: per-token tensors a reducer carries from block to block (`carry`), by name,
            each with the rule the runtime reduces it by with every plan.
        mask_eps, mask_self_loop: the `masked_softmax` options under ``mask`` (the reducer's
            ``mask_eps`` / ``mask_self_loop`` when it has them: LTMP's defaults, DiffRate's
            ``1e-6`` with every query keeping its own key).
        given_attn: ``[B, H, M, M]`` attention probabilities a reducer at position ``start``
            hands to this block's attention (MCTF's one-step-ahead attention: the probabilities
            of the unreduced tokens, reduced along both axes); the adapter's attention then uses
            them instead of ``softmax(q k^T)`` (`tmcore.adapter.explicit_attention`). Set during
            one block only; ``None`` otherwise.
        grid: ``(height, width)`` of the input's finest token grid, as the forward got it
            (`tmcore.Adapter.input_grid`), or ``None``.
        block: block scope only: the current block's `BlockScope` (its input, grid and plan);
            ``None`` in model scope and between blocks.
    """

    __slots__ = (
        "size",
        "valid",
        "input_valid",
        "mask",
        "source",
        "captured",
        "prop_attn",
        "num_protected",
        "num_input",
        "trace",
        "needs",
        "expanded",
        "first_sample",
        "carried",
        "given_attn",
        "mask_eps",
        "mask_self_loop",
        "grid",
        "block",
    )

    def __init__(self, num_protected: int, num_input: int, prop_attn: bool, trace: Trace | None) -> None:
        self.size: Tensor | None = None
        self.valid: Tensor | None = None
        self.input_valid: Tensor | None = None
        self.mask: Tensor | None = None
        self.source: Tensor | None = None
        self.captured: dict[str, Tensor] = {}
        self.prop_attn = prop_attn
        self.num_protected = num_protected
        self.num_input = num_input
        self.trace = trace
        self.needs: tuple[frozenset[str], ...] | None = None
        self.expanded: int | None = None
        self.first_sample = 0
        self.carried: dict[str, Carried] = {}
        self.given_attn: Tensor | None = None
        self.mask_eps = MASK_EPS
        self.mask_self_loop = False
        self.grid: tuple[int, int] | None = None
        self.block: BlockScope | None = None

    def carry(self, name: str, tensor: Tensor, rule: CarryRule = "sum") -> None:
        """Carry ``tensor`` ``[B, N, ...]`` (one entry per current token) to the next blocks: the
        runtime applies every later plan to it by ``rule`` (`tmcore.plan.carry_through`: ``sum``,
        ``mean``, ``amax`` over each group, or ``first``, the value of the token that seeds the
        slot), as it does to sizes, and gradient-checkpoint replay restores it with the rest of
        the state. Read it back with ``state.carried[name].tensor``; it lives for one forward."""
        self.carried = {**self.carried, name: Carried(tensor, rule)}

    def sample_index(self, x: Tensor) -> Tensor:
        """``[B]`` long: each sample's number, ``first_sample + b``. A reducer that is random by
        design (``stochastic``) draws from it (and its seed, block and token positions), so a
        sample draws the same alone as in its batch."""
        return torch.arange(x.shape[0], device=x.device) + self.first_sample

    def copy(self) -> TokenState:
        """A copy to replay a block from (gradient checkpointing): the same tensors (a step
        replaces them, never writes into them), no captures, no trace."""
        new = TokenState(self.num_protected, self.num_input, self.prop_attn, None)
        for name in (
            "size",
            "valid",
            "input_valid",
            "mask",
            "source",
            "needs",
            "expanded",
            "first_sample",
            "carried",
            "mask_eps",
            "mask_self_loop",
            "grid",
        ):
            setattr(new, name, getattr(self, name))
        return new

    def attn_bias(self, dtype: torch.dtype) -> Tensor | None:
        """The additive attention bias ``[B, 1, 1, N]``: ``log(size)`` per key (proportional
        attention, when enabled) and the dtype's lowest value on invalid keys; ``None`` when there
        is none, so the backbone's fused attention runs exactly as unpatched.

        Invalid keys get ``finfo(dtype).min``, not ``-inf``: a key next to one real key still
        weighs exactly 0 (its exponent underflows), and a row with no real key at all (a sample
        that is all padding, as bucketing loaders produce) gives a finite softmax instead of NaN,
        as the unpatched models do."""
        bias = log_size_bias(self.size) if self.prop_attn and self.size is not None else None
        if self.valid is not None:
            invalid = (~self.valid).unsqueeze(1).unsqueeze(1)
            bias = bias if bias is not None else invalid.new_zeros(invalid.shape, dtype=torch.float32)
            return bias.to(dtype).masked_fill(invalid, torch.finfo(dtype).min)
        return None if bias is None else bias.to(dtype)

    def attn_probs(self, logits: Tensor) -> Tensor:
        """Soft-mask attention: `masked_softmax` of ``logits`` ``[B, H, N, N]`` (biases already
        added) under `mask`; the adapter's explicit attention path while `mask` is set."""
        if self.mask is None:
            raise RuntimeError("attn_probs needs a soft mask (training mode of a reducer with soft_step)")
        return masked_softmax(logits, self.mask, self.mask_eps, self.mask_self_loop)

    def count(self, x: Tensor) -> int | Tensor:
        """Tokens per sample of ``x``: an int, or a ``[B]`` long tensor for ragged batches and
        for alive tokens under a soft mask."""
        if self.mask is not None:
            return self.mask.detach().sum(1).round().long()
        if self.valid is not None:
            return self.valid.sum(1)
        return x.shape[1] if self.expanded is None else self.expanded


def log_size_bias(size: Tensor) -> Tensor:
    """Proportional attention's additive bias, ``[B, N, 1]`` sizes -> ``[B, 1, 1, N]`` ``log(size)``
    per key, in float32 at least (half sizes lose integers), float64 for float64 models."""
    return size.to(torch.promote_types(size.dtype, torch.float32)).log().transpose(1, 2).unsqueeze(1)


def class_logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """The class token's attention logits, one query against all keys, without the ``N x N`` matrix.

    Args:
        q, k: ``[B, H, N, d]`` queries and keys as the attention used them (any strides).
        scale: the attention's logit scale.

    Returns:
        ``[B, H, 1, N]`` ``scale * q_0 . k_j`` per head (no bias).

    Computed as one ``[B, N, H d] @ [B, H d, H]`` product with a block-diagonal query: the keys
    are read in place (a head-adjacent layout, e.g. a fused qkv projection, is viewed, not
    copied), where ``q[:, :, :1] @ k^T`` first copies every key into a ``[B H, d, N]`` batch
    (3x slower on CPU at N = 197).
    """
    b, h, _, d = k.shape
    heads = torch.arange(h * d, device=k.device) // d == torch.arange(h, device=k.device).unsqueeze(1)
    query = (q[:, :, 0] * scale).reshape(b, h * d, 1) * heads.t().to(q.dtype)  # [B, H d, H]
    return (k.transpose(1, 2).flatten(2) @ query.to(k.dtype)).transpose(1, 2).unsqueeze(2)


class LayerInputs:
    """What a reducer may read from one attention layer, computed only when asked for.

    Built from the q, k, v the adapter captured (each ``[B, H, N, d]``, exactly as the attention
    used them) and the attention bias. Names match `INPUTS`:
    ``keys`` ``[B, N, d]`` head-mean keys; ``cls_attn`` ``[B, H, N]`` the class token's attention
    row (one query against all keys, with the block's bias and scale: no ``N x N`` matrix);
    ``attn`` ``[B, H, N, N]`` full attention probabilities (the adapter's own when it computed
    them explicitly, e.g. under a soft mask, else recomputed from q and k); ``values``
    ``[B, H, N, d]``. ``needs`` is what the reducer reads in this block and forward
    (`tmcore.runtime.Runtime.block_needs`): what the adapter captured; anything else is an error,
    not a silent recomputation. ``tokens`` is the block's ``[B, N, C]`` tokens at the reduction
    position (always there, nothing to declare): for the shape and device of a plan that reads
    no attention input, or for scores computed from the features.
    """

    def __init__(
        self,
        captured: dict[str, Tensor],
        bias: Tensor | None,
        scale: float,
        needs: frozenset[str] = INPUTS,
        tokens: Tensor | None = None,
    ) -> None:
        self._c = captured
        self._bias = bias
        self._scale = scale
        self.needs = needs
        self.tokens = tokens
        self._cache: dict[str, Tensor] = {}

    def _check(self, name: str) -> None:
        if name not in self.needs:
            raise RuntimeError(
                f"the reducer read {name!r} in a block whose needs(layer) is {sorted(self.needs)}; "
                f"add {name!r} to what `needs` returns for that block (and to `requires`)"
            )

    def _get(self, name: str) -> Tensor:
        if name not in self._c:
            raise RuntimeError(f"the adapter did not capture {name!r}; declare it in the reducer's `requires`")
        return self._c[name]

    def _probs(self, logits: Tensor) -> Tensor:
        if self._bias is not None:
            logits = logits + self._bias.to(logits.dtype)
        return logits.softmax(dim=-1)

    @property
    def keys(self) -> Tensor:
        self._check("keys")
        if "keys" not in self._cache:
            self._cache["keys"] = self._get("k").mean(dim=1)
        return self._cache["keys"]

    @property
    def cls_attn(self) -> Tensor:
        self._check("cls_attn")
        if "cls_attn" not in self._cache:
            self._cache["cls_attn"] = self._probs(class_logits(self._get("q"), self._get("k"), self._scale)).squeeze(2)
        return self._cache["cls_attn"]

    @property
    def attn(self) -> Tensor:
        self._check("attn")
        if "attn" in self._c:
            return self._c["attn"]
        if "attn" not in self._cache:
            self._cache["attn"] = self._probs((self._get("q") * self._scale) @ self._get("k").transpose(-1, -2))
        return self._cache["attn"]

    @property
    def values(self) -> Tensor:
        self._check("values")
        return self._get("v")
