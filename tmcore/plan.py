"""The Plan: one representation for every merge / prune decision, and the ops that apply it.

A Plan maps ``N`` input tokens to ``M`` output tokens. Output slot ``j`` is seeded by input
token ``keep[:, j]``; each input token ``src[:, k]`` is then folded into slot ``src_dst[:, k]``,
or dropped where ``src_dst[:, k] = -1``; an input token in neither set is pruned too. The order
of ``keep`` *is* the output order, which the published methods choose on purpose (ToMe's
reshuffle), so it is part of the plan.

Merging averages each group's features with the plan's ``weight`` (a per-token importance, e.g.
ToMeCIS's class-attention score) or, without one, with the token sizes (ToMe); sizes themselves
are always summed, so proportional attention and pooling see how many inputs a token stands for.

Mixed plans: every sample removes the same number of tokens, some samples by merging and others
by dropping (PPT pools some images and prunes others). Dropped tokens are ``src`` entries with
``src_dst = -1``, so a pruning plan has the same shapes as a merging plan that removes as many
(`Plan.prune` with ``drop``), and `select` picks one of two such plans per sample: one
fixed-shape plan, no padding mask, no host synchronisation.

Ragged plans (adaptive methods such as LTMP, where every sample keeps a different number of
tokens) carry ``valid`` ``[B, M]``, ``False`` on padding slots; ``M`` is the largest count in
the batch and `pack` puts each sample's tokens first. Padding slots are seeded by a real token
(token 0), so they hold finite values; the runtime masks them out of attention and pooling. A
ragged plan uses ``src_dst = -1`` the same way, so that per-sample merge counts fit one
``[B, K]`` tensor.

Everything here is batched tensor code: gathers and one scatter per call, no Python loops over
images or tokens, no host synchronisation (except `pack`, which must learn ``M``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from tmcore.errors import InvalidInputError

__all__ = [
    "Plan",
    "reduce",
    "merge_weighted",
    "merge_tokens",
    "merge_amax",
    "merge_mlerp",
    "carry_through",
    "select",
    "unmerge",
    "destinations",
    "compose_source",
    "pack",
    "source_matrix",
    "identity_source",
    "spread",
    "slot_positions",
    "size_dtype",
    "unit_sizes",
    "plan_problems",
    "plan_value_problems",
]

ReduceMode = Literal["sum", "mean", "amax"]


@dataclass(frozen=True)
class Plan:
    """How one layer turns ``num_in`` tokens into ``keep.shape[1]`` tokens.

    Attributes:
        keep: ``[B, M]`` long, the input token that seeds each output slot, in output order.
        src: ``[B, K]`` long, input tokens merged into an existing slot or dropped (``K`` may be 0).
        src_dst: ``[B, K]`` long, the output slot (``0 <= slot < M``) each ``src`` token joins;
            ``-1``: the token is dropped.
        num_in: ``N``, the number of input tokens.
        valid: ``[B, M]`` bool, ``False`` on padding slots of a ragged plan; ``None`` when every
            sample keeps all ``M`` slots (fixed-count plans, the fast path).
        weight: ``[B, N, 1]`` positive weight of each input token in the average of its group
            (`merge_tokens`); ``None``: the token sizes (size-weighted merging, ToMe).
        size_scale: ``[B, N, 1]`` factor on each input token's size before a group's sizes are
            summed (DiffRate transfers a merged token's size scaled by its similarity to the
            destination); ``None``: sizes are summed as they are, so merging conserves them.
    """

    keep: Tensor
    src: Tensor
    src_dst: Tensor
    num_in: int
    valid: Tensor | None = None
    weight: Tensor | None = None
    size_scale: Tensor | None = None

    @property
    def num_out(self) -> int:
        return self.keep.shape[1]

    @classmethod
    def prune(cls, keep: Tensor, num_in: int, valid: Tensor | None = None, drop: Tensor | None = None) -> Plan:
        """A plan that keeps ``keep`` ``[B, M]`` (in that order) and drops every other token.

        ``drop`` ``[B, K]`` lists the dropped tokens explicitly (as ``src`` with ``src_dst = -1``):
        the plan then has the shapes of a merging plan that removes ``K`` tokens, for `select`.
        """
        if drop is None:
            drop = keep.new_empty((keep.shape[0], 0))
        return cls(keep=keep, src=drop, src_dst=torch.full_like(drop, -1), num_in=num_in, valid=valid)

    def with_weight(self, weight: Tensor | None) -> Plan:
        """This plan, averaging merged groups with ``weight`` ``[B, N, 1]`` instead of sizes."""
        return replace(self, weight=weight)

    def with_equal_weights(self) -> Plan:
        """This plan, averaging each merged group as a plain mean of its tokens (sizes summed)."""
        return replace(self, weight=torch.ones(self.keep.shape[0], self.num_in, 1, device=self.keep.device))

    def with_size_scale(self, size_scale: Tensor | None) -> Plan:
        """This plan, summing each group's sizes scaled by ``size_scale`` ``[B, N, 1]``."""
        return replace(self, size_scale=size_scale)


def size_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype token sizes (and pooling weights) are counted in for tokens of ``dtype``:
    float32, or float64 for float64 tokens. Never a half type: bfloat16 holds integers exactly
    only up to 256 (a group of 1,021 patches would weigh 1,020)."""
    return torch.promote_types(dtype, torch.float32)


def unit_sizes(x: Tensor) -> Tensor:
    """``[B, N, 1]`` sizes of the tokens of ``x`` ``[B, N, C]`` before any reduction (each stands
    for one input token), in `size_dtype`."""
    return torch.ones(x.shape[0], x.shape[1], 1, dtype=size_dtype(x.dtype), device=x.device)


def _rows(index: Tensor, channels: int) -> Tensor:
    """``[B, K]`` token index -> ``[B, K, C]`` gather/scatter index (a view, no copy)."""
    return index.unsqueeze(-1).expand(-1, -1, channels)


def _flat(index: Tensor, n: int, dropped: bool = False) -> Tensor:
    """``[B, K]`` per-sample token index -> ``[B * K]`` row index into a ``[B * n, C]`` view.

    An entry outside ``[0, n)`` would otherwise read (or write) another sample's row: it goes to
    row ``B * n + 1``, past the end, so the index op fails instead of mixing samples (no host
    synchronisation). At batch 1 there is no other sample, and the index ops refuse such an entry
    themselves. With ``dropped``, ``-1`` entries (dropped tokens) go to row ``B * n``, a spare row
    the caller cuts off."""
    b = index.shape[0]
    if b == 1 and not dropped:
        return index.flatten()
    flat = index if b == 1 else index + torch.arange(b, device=index.device).unsqueeze(1) * n
    flat = torch.where(index.clamp(0, n - 1) == index, flat, b * n + 1)
    if dropped:
        flat = torch.where(index == -1, b * n, flat)
    return flat.flatten()


_Layout = tuple[Tensor, Tensor, Tensor]


def _layout(plan: Plan, n: int) -> _Layout:
    """Flat row indices ``(seed rows, src rows, their output rows)`` into ``[B * n, C]`` inputs
    and ``[B * M (+ 1), C]`` outputs. Dropped ``src`` entries (``src_dst = -1``) all go to one
    spare output row ``B * M``, which the caller cuts off (works for every mode). Whether a plan
    drops anything is data, so the spare row is always there: no host sync. Computed once per
    plan and call, whatever the tensors it is applied to."""
    keep, src = _flat(plan.keep, n), _flat(plan.src, n)
    dst = _flat(plan.src_dst, plan.num_out, dropped=True)
    if plan.src.shape[1]:
        keep = torch.cat([keep, keep[:1]])
    return keep, src, dst


def reduce(x: Tensor, plan: Plan, mode: ReduceMode = "sum") -> Tensor:
    """Apply ``plan`` to a token tensor.

    Args:
        x: ``[B, N, C]`` features, sizes (``C = 1``), masks or positions.
        plan: a Plan with ``plan.num_in == N``.
        mode: how merged tokens combine with their slot (the slot's own value included):
            ``sum``, ``mean`` (plain mean of the group) or ``amax``.

    Returns:
        ``[B, M, C]``.
    """
    if plan.src.shape[1] == 0 and plan.keep.stride(0) == 0:  # one order shared by the batch
        return x.index_select(1, plan.keep[0])
    return _reduce(x, plan, _layout(plan, x.shape[1]), mode)


def _reduce(x: Tensor, plan: Plan, layout: _Layout, mode: ReduceMode = "sum") -> Tensor:
    # Row gathers on the flattened batch (index_select / index_add_) run several times faster
    # on CPU than gather / scatter_add with an index expanded over channels.
    b, n, c = x.shape
    m = plan.num_out
    rows = x.reshape(b * n, c)
    keep, src_rows, dst = layout
    out = rows.index_select(0, keep)
    if plan.src.shape[1] == 0:
        return out.view(b, m, c)
    src = rows.index_select(0, src_rows)
    if mode == "sum":
        out.index_add_(0, dst, src)
    else:
        out.scatter_reduce_(0, dst.unsqueeze(1).expand(-1, c), src, reduce=mode, include_self=True)
    return out[: b * m].view(b, m, c)


def merge_weighted(x: Tensor, plan: Plan, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weighted average of every merged group (ToMe's ``merge_wavg``, docs/algorithms.md 1.4).

    Args:
        x: ``[B, N, C]`` features.
        plan: the Plan to apply.
        weight: ``[B, N, 1]`` per-token weight (token size for ToMe), ``None`` for all ones.

    Returns:
        ``([B, M, C] weighted mean per group, [B, M, 1] summed weight per group)``.
        With ``weight = size`` the second output is the new size, and ``sum(size)`` is conserved.
    """
    if plan.src.shape[1] == 0:  # pure selection / re-ordering: kept tokens keep their values
        return reduce(x, plan), reduce(unit_sizes(x) if weight is None else weight, plan)
    return _merge_weighted(x, plan, weight, _layout(plan, x.shape[1]))


def _merge_weighted(x: Tensor, plan: Plan, weight: Tensor | None, layout: _Layout) -> tuple[Tensor, Tensor]:
    if weight is None:
        total = _reduce(unit_sizes(x), plan, layout)
        return _reduce(x, plan, layout).div_(total), total
    total = _reduce(weight, plan, layout)
    # sum(w * x) / sum(w), weighting rows after the gather (one pass less than x * w first)
    b, n, c = x.shape
    rows, w_rows = x.reshape(b * n, c), weight.reshape(b * n, 1)
    keep, src, dst = layout
    out = rows.index_select(0, keep).mul_(w_rows.index_select(0, keep).to(x.dtype))
    merged = rows.index_select(0, src).mul_(w_rows.index_select(0, src).to(x.dtype))
    out.index_add_(0, dst, merged)
    return out[: b * plan.num_out].view(b, plan.num_out, c).div_(total), total


def merge_tokens(x: Tensor, plan: Plan, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """Apply ``plan`` to features and sizes: the default ``reduce`` of every reducer.

    Each output token is the weighted mean of its group, with the plan's ``weight`` or, when it
    has none, the token sizes (ToMe's ``merge_wavg``); its size is the group's summed size
    (each scaled by ``plan.size_scale`` when the plan has one), so without a scale ``sum(size)``
    is conserved by merging and dropped tokens take their sizes with them.

    Args:
        x: ``[B, N, C]`` features.
        plan: the Plan to apply.
        size: ``[B, N, 1]`` token sizes, ``None`` for all ones (before the first reduction).

    Returns:
        ``([B, M, C] features, [B, M, 1] sizes)``.
    """
    if plan.weight is None and plan.size_scale is None:
        return merge_weighted(x, plan, size)
    if size is None:
        size = unit_sizes(x)
    scaled = size if plan.size_scale is None else size * plan.size_scale.to(size.dtype)
    if plan.src.shape[1] == 0:
        return reduce(x, plan), reduce(scaled, plan)
    layout = _layout(plan, x.shape[1])
    weight = size if plan.weight is None else plan.weight
    return _merge_weighted(x, plan, weight, layout)[0], _reduce(scaled, plan, layout)


def merge_amax(x: Tensor, plan: Plan, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """Merge rule: each output token is the elementwise maximum of its group (MCTF's max
    pooling); sizes as in `merge_tokens`.

    Returns:
        ``([B, M, C] features, [B, M, 1] sizes)``.
    """
    new_size = merge_tokens(x[..., :1], plan, size)[1]
    return reduce(x, plan, "amax"), new_size


def merge_mlerp(x: Tensor, plan: Plan, size: Tensor | None, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Merge rule MLERP (ToFu, Kim et al., WACV 2024): each merged group keeps the direction of
    its weighted mean (`merge_tokens`: the plan's weights, else sizes) and takes the norm of its
    largest member, so merging does not shrink features the way averaging does (the norm of a
    mean is at most the mean of the norms). Groups of one token come out as `merge_tokens` gives them (no rescale).

    Args:
        x: ``[B, N, C]`` features.
        plan: the Plan to apply (dropped tokens take no part).
        size: ``[B, N, 1]`` token sizes, ``None`` for all ones.
        eps: lower bound on a mean's norm (a group that averages to zero stays zero).

    Returns:
        ``([B, M, C] features, [B, M, 1] sizes)``, sizes as `merge_tokens` gives them.
    """
    mean, new_size = merge_tokens(x, plan, size)
    if plan.src.shape[1] == 0:
        return mean, new_size
    layout = _layout(plan, x.shape[1])
    largest = _reduce(x.norm(dim=-1, keepdim=True), plan, layout, "amax")
    members = _reduce(torch.ones_like(x[..., :1]), plan, layout)
    rescaled = mean * (largest / mean.norm(dim=-1, keepdim=True).clamp_min(eps))
    return torch.where(members > 1, rescaled, mean), new_size


def carry_through(t: Tensor, plan: Plan, rule: Literal["sum", "mean", "amax", "first"] = "sum") -> Tensor:
    """A per-token tensor a reducer carries (`tmcore.state.TokenState.carry`) through ``plan``.

    Args:
        t: ``[B, N, ...]``, one entry per input token.
        plan: the Plan to apply.
        rule: ``sum``, ``mean`` or ``amax`` over each group (dropped tokens take no part), or
            ``first``: the value of the token that seeds each slot.

    Returns:
        ``[B, M, ...]``.
    """
    flat = t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))  # not -1: an empty batch has 0 elements
    if rule == "first":
        out = flat.gather(1, _rows(plan.keep, flat.shape[-1]))
    else:
        out = reduce(flat, plan, rule)
    return out.reshape(t.shape[0], plan.num_out, *t.shape[2:])


def select(take_a: Tensor, a: Plan, b: Plan) -> Plan:
    """Per sample, plan ``a`` where ``take_a`` else plan ``b``: one fixed-shape plan.

    Args:
        take_a: ``[B]`` bool.
        a, b: plans with equal shapes (``num_in``, ``M`` and ``K``); for a pruning plan beside
            a merging one, list the dropped tokens with ``Plan.prune(..., drop=...)``. Their
            ``valid``, ``weight`` and ``size_scale`` must each be set in both or in neither.

    Returns:
        A Plan whose sample ``i`` is sample ``i`` of ``a`` or of ``b`` (``torch.where``, no sync).
    """
    if a.num_in != b.num_in or a.keep.shape != b.keep.shape or a.src.shape != b.src.shape:
        raise ValueError(
            f"select needs plans of equal shapes, got N={a.num_in}, keep {tuple(a.keep.shape)}, "
            f"src {tuple(a.src.shape)} and N={b.num_in}, keep {tuple(b.keep.shape)}, src {tuple(b.src.shape)}"
        )

    def pick(u: Tensor | None, v: Tensor | None, name: str) -> Tensor | None:
        if u is None and v is None:
            return None
        if u is None or v is None:
            raise ValueError(f"select: one plan has a {name} and the other has none")
        return torch.where(take_a.view(-1, *([1] * (u.dim() - 1))), u, v)

    return Plan(
        keep=pick(a.keep, b.keep, "keep"),
        src=pick(a.src, b.src, "src"),
        src_dst=pick(a.src_dst, b.src_dst, "src_dst"),
        num_in=a.num_in,
        valid=pick(a.valid, b.valid, "valid"),
        weight=pick(a.weight, b.weight, "weight"),
        size_scale=pick(a.size_scale, b.size_scale, "size_scale"),
    )


def destinations(plan: Plan) -> Tensor:
    """``[B, N]`` long: the output slot of every input token, ``-1`` where it was pruned."""
    b, m = plan.keep.shape
    dest = plan.keep.new_full((b, plan.num_in), -1)
    slots = torch.arange(m, device=plan.keep.device).expand(b, m)
    if plan.valid is None:
        dest.scatter_(1, plan.keep, slots)
        if plan.src.shape[1]:
            dest.scatter_(1, plan.src, plan.src_dst)
        return dest
    # Ragged: padding slots and unused src entries write -1, and a token's real slot (>= 0)
    # wins over them whatever the write order, so amax is exact (a real token is either kept
    # or merged, never both).
    dest.scatter_reduce_(1, plan.keep, slots.masked_fill(~plan.valid, -1), reduce="amax")
    if plan.src.shape[1]:
        dest.scatter_reduce_(1, plan.src, plan.src_dst, reduce="amax")
    return dest


def unmerge(y: Tensor, plan: Plan) -> Tensor:
    """Undo one plan's shape: ``[B, M, C]`` -> ``[B, N, C]``.

    Every input position receives the value of the slot it went to (merged tokens get a copy of
    their group's value); pruned positions get zeros.
    """
    pruned = not (plan.src.shape[1] == 0 and plan.keep.shape[1] == plan.num_in and plan.valid is None)
    return spread(y, destinations(plan), pruned)


def spread(y: Tensor, source: Tensor, pruned: bool = True) -> Tensor:
    """Tokens back in the input layout through a source map: ``[B, M, C]`` -> ``[B, N, C]``.

    Args:
        y: ``[B, M, C]`` tokens, one per slot.
        source: ``[B, N]`` long, the slot of every input position, ``-1`` where pruned.
        pruned: whether ``source`` may hold ``-1`` (those positions get zeros); ``False`` skips
            the mask.

    Returns:
        ``[B, N, C]``: every position holds its slot's value (merged tokens share one).
    """
    out = y.gather(1, _rows(source.clamp(min=0), y.shape[-1]))
    return out.masked_fill(source.unsqueeze(-1) < 0, 0) if pruned else out


def slot_positions(source: Tensor, num_slots: int) -> Tensor:
    """One input position per slot: the inverse of `spread` (``spread(y, source).gather`` at
    these positions gives ``y`` back on every slot that some position maps to).

    Args:
        source: ``[B, N]`` long source map (``-1`` where pruned).
        num_slots: ``M``.

    Returns:
        ``[B, M]`` long: the last input position of each slot, 0 for slots no position maps to
        (padding slots of a ragged batch).
    """
    b, n = source.shape
    positions = torch.arange(n, device=source.device).expand(b, n)
    slot = torch.where(source < 0, num_slots, source)  # pruned positions go to a spare column
    last = torch.zeros(b, num_slots + 1, dtype=torch.long, device=source.device)
    return last.scatter_reduce(1, slot, positions, reduce="amax")[:, :num_slots]


def pack(
    candidates: Tensor,
    kept: Tensor,
    num_in: int,
    src: Tensor | None = None,
    src_target: Tensor | None = None,
    num_out: int | None = None,
) -> Plan:
    """Build a ragged Plan from per-sample decisions: each sample keeps its flagged candidates,
    in candidate order, packed to the front; the rest of the ``M`` slots is padding.

    Args:
        candidates: ``[B, L]`` (or ``[L]``, shared) long, input tokens in output order.
        kept: ``[B, L]`` bool, the candidates that become output slots.
        num_in: ``N``, the number of input tokens.
        src: ``[B, K]`` long, input tokens to fold into a candidate's slot (optional).
        src_target: ``[B, K]`` long, the candidate position (index into ``candidates``) each
            ``src`` token joins, ``-1`` for none; a token whose candidate is not kept is dropped
            with it.
        num_out: ``M`` when the caller knows a bound on every sample's count (fixed-count
            reducers on padded batches): no host synchronisation. Must be ``>= kept.sum(1)``.

    Returns:
        A Plan with ``valid``; ``M = max(kept.sum(1))`` unless ``num_out`` is given (the one host
        synchronisation here).
    """
    b, length = kept.shape
    candidates = candidates.expand(b, length)
    slot = kept.cumsum(1) - 1  # [B, L] output slot of every kept candidate
    count = kept.sum(1)
    m = num_out if num_out is not None else _max_count(count, length)
    # Unkept candidates are written to a spare column m, cut off below; padding stays token 0.
    keep = candidates.new_zeros(b, m + 1).scatter_(1, torch.where(kept, slot, m), candidates)[:, :m]
    valid = torch.arange(m, device=kept.device) < count.unsqueeze(1)
    if src is None or src_target is None or src.shape[1] == 0:
        return Plan.prune(keep, num_in, valid)
    target = src_target.clamp(min=0)
    joins = (src_target >= 0) & kept.gather(1, target)
    src_dst = torch.where(joins, slot.gather(1, target), -1)
    return Plan(keep=keep, src=src, src_dst=src_dst, num_in=num_in, valid=valid)


def _max_count(count: Tensor, length: int) -> int:
    """The longest sample's count (a host sync); an empty batch keeps every slot (the model's
    shape, e.g. its class token, stays as for any other batch)."""
    if count.device.type == "meta":
        raise InvalidInputError(
            "this reducer decides its token counts from the values (adaptive, per sample), which "
            "tensors on the meta device do not have; run the forward on a real device"
        )
    return int(count.max()) if count.numel() else length


def identity_source(batch: int, num_tokens: int, device: torch.device | None = None) -> Tensor:
    """The source map before any reduction: ``[B, N0]`` with token ``i`` in slot ``i``."""
    return torch.arange(num_tokens, device=device).expand(batch, num_tokens).clone()


def compose_source(source: Tensor, plan: Plan) -> Tensor:
    """Follow a source map through one more plan.

    Args:
        source: ``[B, N0]`` long, the current slot of every original token (``-1``: pruned).
        plan: the next layer's Plan (``plan.num_in`` = current token count).

    Returns:
        ``[B, N0]`` long, the slot after ``plan``. O(N0); no ``N x N`` matrix is built.
    """
    dest = destinations(plan)
    moved = dest.gather(1, source.clamp(min=0))
    return torch.where(source < 0, source, moved)


def source_matrix(source: Tensor, num_slots: int) -> Tensor:
    """ToMe's ``[B, M, N0]`` 0/1 source matrix from a ``[B, N0]`` source map.

    Row ``g`` marks the original tokens that ended up in output token ``g``; pruned tokens have an
    all-zero column.
    """
    b, n0 = source.shape
    out = torch.zeros(b, num_slots + 1, n0, dtype=torch.bool, device=source.device)
    slot = torch.where(source < 0, num_slots, source)
    out.scatter_(1, slot.unsqueeze(1), True)
    return out[:, :num_slots]


def plan_problems(plan: object, batch: int, num_in: int, num_protected: int, device: torch.device) -> list[str]:
    """What makes ``plan`` unusable on ``[batch, num_in, C]`` tokens with a protected prefix of
    ``num_protected``, from types and shapes alone (no host synchronisation, so the runtime checks
    every plan): tensors of long indices on the tokens' device, one row per sample, ``num_in`` as
    the tokens' length, no more outputs than inputs and room for the prefix in front, ``valid``
    bool ``[B, M]``, ``weight`` floating ``[B, N, 1]``. One phrase per problem; empty: usable."""
    if not isinstance(plan, Plan):
        return [f"match() returned a {type(plan).__name__}; allowed: a tmcore.Plan, or None to leave the block alone"]
    problems = []
    if not isinstance(plan.num_in, int) or isinstance(plan.num_in, bool) or plan.num_in != num_in:
        problems.append(f"Plan.num_in={plan.num_in!r} for {num_in} input tokens; allowed: {num_in}")
    fields = {"keep": plan.keep, "src": plan.src, "src_dst": plan.src_dst}
    for name, value in fields.items():
        if not isinstance(value, Tensor):
            problems.append(f"Plan.{name} is a {type(value).__name__}; allowed: a torch.long tensor [B, ...]")
        elif value.dtype != torch.long:
            problems.append(f"Plan.{name} has dtype {value.dtype}; allowed: torch.long (int64) indices")
        elif value.dim() != 2 or value.shape[0] != batch:
            problems.append(f"Plan.{name} has shape {tuple(value.shape)}; allowed: [{batch}, ...], one row per sample")
        elif value.device != device:
            problems.append(f"Plan.{name} is on {value.device}; allowed: the tokens' device {device}")
    if problems:
        return problems
    m, k = plan.keep.shape[1], plan.src.shape[1]
    if plan.src_dst.shape != plan.src.shape:
        problems.append(f"Plan.src_dst has shape {tuple(plan.src_dst.shape)}; allowed: Plan.src's [{batch}, {k}]")
    if m > num_in:
        problems.append(f"Plan.keep has {m} output slots for {num_in} input tokens; allowed: at most {num_in}")
    if m < max(num_protected, min(num_in, 1)):
        problems.append(
            f"Plan.keep has {m} output slots; allowed: at least {max(num_protected, 1)} (the protected prefix of "
            f"{num_protected} in front, and one token)"
        )
    if k > num_in:
        problems.append(f"Plan.src lists {k} tokens for {num_in} input tokens; allowed: at most {num_in}")
    for name, value, shape, ok, allowed in (
        ("valid", plan.valid, (batch, m), lambda v: v.dtype == torch.bool, "torch.bool"),
        ("weight", plan.weight, (batch, num_in, 1), lambda v: v.is_floating_point(), "a floating dtype"),
        ("size_scale", plan.size_scale, (batch, num_in, 1), lambda v: v.is_floating_point(), "a floating dtype"),
    ):
        if value is None:
            continue
        if not isinstance(value, Tensor) or not ok(value):
            shown = value.dtype if isinstance(value, Tensor) else type(value).__name__
            problems.append(f"Plan.{name} is {shown}; allowed: {allowed}, shape {list(shape)}, or None")
        elif tuple(value.shape) != shape:
            problems.append(f"Plan.{name} has shape {tuple(value.shape)}; allowed: {list(shape)} or None")
        elif value.device != device:
            problems.append(f"Plan.{name} is on {value.device}; allowed: the tokens' device {device}")
    return problems


def plan_value_problems(plan: Plan, num_protected: int, valid: Tensor | None = None) -> list[str]:
    """What is wrong with the values of a structurally usable ``plan`` (`plan_problems` found
    nothing): indices in range, no input token in two places, the protected prefix kept in place
    and in front, padding slots after the real ones, weights finite and positive on real tokens.
    Reads the values (host synchronisation): the conformance suite runs it on every reducer, and
    the runtime on every plan under ``tmcore.check_plans()`` (``TMCORE_CHECK_PLANS=1``).

    Args:
        plan: the plan.
        num_protected: ``p``.
        valid: ``[B, N]`` bool padding mask of the plan's input (``None``: every token is real).

    Returns:
        One phrase per problem, naming the field and the first sample it was found in.
    """
    problems = []
    b, m = plan.keep.shape
    n = plan.num_in

    def first(bad: Tensor) -> str:  # [B, ...] bool -> "sample i"
        return f"sample {int(bad.flatten(1).any(1).nonzero()[0])}"

    for name, value, low, high in (
        ("keep", plan.keep, 0, n),
        ("src", plan.src, 0, n),
        ("src_dst", plan.src_dst, -1, m),
    ):
        bad = (value < low) | (value >= high)
        if bad.any():
            problems.append(f"Plan.{name} holds {int(value[bad][0])} in {first(bad)}; allowed: {low} <= index < {high}")
    if problems:
        return problems
    slot_real = plan.valid if plan.valid is not None else torch.ones_like(plan.keep, dtype=torch.bool)
    # a ragged plan may list unused src entries (-1) for tokens it keeps: only merges count there
    listed = plan.src_dst >= 0 if plan.valid is not None else torch.ones_like(plan.src, dtype=torch.bool)
    uses = torch.zeros(b, n, dtype=torch.long, device=plan.keep.device)
    uses.scatter_add_(1, plan.keep, slot_real.long()).scatter_add_(1, plan.src, listed.long())
    if (uses > 1).any():
        token = int((uses > 1).long().argmax(1)[(uses > 1).any(1)][0])
        problems.append(
            f"input token {token} is in more than one place in {first(uses > 1)} (Plan.keep's real slots and Plan.src "
            "together list every input token at most once)"
        )
    p = min(num_protected, m)
    prefix = torch.arange(p, device=plan.keep.device)
    if p and not (plan.keep[:, :p] == prefix).all():
        bad = plan.keep[:, :p] != prefix
        problems.append(
            f"Plan.keep[:, :{p}] is {plan.keep[:, :p][bad.any(1)][0].tolist()} in {first(bad)}; allowed: "
            f"{prefix.tolist()}, the protected prefix kept in place and in front"
        )
    if p and plan.src.shape[1] and ((plan.src < p) & listed).any():
        problems.append(
            f"Plan.src lists a protected token in {first((plan.src < p) & listed)}; protected tokens are never "
            "merged or dropped"
        )
    if plan.valid is not None and (plan.valid[:, 1:] & ~plan.valid[:, :-1]).any():
        problems.append(
            f"Plan.valid has a padding slot before a real one in {first(plan.valid[:, 1:] & ~plan.valid[:, :-1])}; "
            "allowed: every sample's real slots first"
        )
    if plan.weight is not None:
        real = valid.unsqueeze(-1) if valid is not None else torch.ones_like(plan.weight, dtype=torch.bool)
        bad = ~(torch.isfinite(plan.weight) & (plan.weight > 0)) & real
        if bad.any():
            problems.append(
                f"Plan.weight holds {float(plan.weight[bad][0])} in {first(bad)}; allowed: finite and > 0 on real "
                "tokens (the weights of a group divide its sum)"
            )
    return problems
