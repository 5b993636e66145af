"""LTMP (docs/algorithms.md section 4): learned merge and prune thresholds per block.

Training mode (``model.train()``) is `LTMP.soft_step`: nothing is removed; straight-through
threshold masks switch tokens off in a keep-mask that the adapter applies inside attention
(4.4). Inference (``model.eval()``) is `LTMP.score` / `LTMP.match`: tokens are removed, each
image keeping its own count, as a ragged batch padded to the largest count (4.5). Thresholds
are ``nn.Parameter``s on the reducer, saved by ``tmcore.save``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from tm_ltmp.masks import best_match, concat_order, importance, output_order, output_position, threshold_mask
from tmcore import BaseReducer, InvalidConfigError, LayerInputs, Plan, ReducerConfig, Scores, TokenState
from tmcore.config import Choice, Number, PerBlock, per_block, rule_of, show
from tmcore.plan import merge_weighted, pack, reduce, unit_sizes

__all__ = ["LTMP", "LTMPConfig", "DEFAULT_THRESHOLDS"]

Mode = Literal["merge_prune", "prune_merge", "merge", "prune"]

Threshold = Number(ge=-1, le=2)
"""One block's merge or prune threshold, in a config or a thresholds file."""
_THRESHOLD = rule_of(Threshold)

DEFAULT_THRESHOLDS: dict[str, tuple[float, float]] = {
    "merge_prune": (0.9, 0.0),  # the original: merge at 1.0 would only ever learn pruning
    "prune_merge": (1.0, 0.0),
    "merge": (1.0, 0.0),
    "prune": (1.0, 0.0),
}
"""Initial ``(merge, prune)`` thresholds per mode, as in the original training models (4.3)."""


class LTMPConfig(ReducerConfig):
    mode: Choice(Mode) = Field(
        default="merge_prune",
        description=(
            "merge_prune (the paper's: merge then prune), prune_merge (prune on this block's importance, "
            "then merge), merge (merging only), prune (pruning only, no proportional attention)"
        ),
    )
    tau: Number(gt=0, le=10) = Field(
        default=0.5,
        description="temperature of the straight-through sigmoid masks, 0 < tau <= 10 (training only)",
    )
    merge_threshold: PerBlock(Threshold) | None = Field(
        default=None,
        description=(
            "initial merge threshold(s): cosine similarity above which a token merges, one float for "
            "every block or a per-block list, each in [-1, 2] (> 1 disables merging); default per mode "
            "(0.9 for merge_prune, else 1.0)"
        ),
    )
    prune_threshold: PerBlock(Threshold) | None = Field(
        default=None,
        description=(
            "initial prune threshold(s): mean attention received at or below which a token is pruned, "
            "one float or a per-block list, each in [-1, 2] (< 0 disables pruning); default 0"
        ),
    )
    reduction_target: Number(gt=0, le=1) = Field(
        default=0.75,
        description="FLOPs ratio that tm_ltmp.fit trains the thresholds towards, 0 < target <= 1",
    )


def _threshold_problem(value: Tensor, layers: int) -> str:
    """What is wrong with ``value`` as the ``[layers]`` thresholds of a model (``""``: nothing):
    a floating dtype, that shape, and every entry a `Threshold`, as in a config."""
    allowed = f"allowed: a floating-point tensor of shape ({layers},), each value {_THRESHOLD.allowed}"
    if not value.is_floating_point():
        return f"has dtype {value.dtype}; {allowed}"
    if value.shape != (layers,):
        blocks = value.shape[0] if value.dim() == 1 else "?"
        return (
            f"has shape {tuple(value.shape)} (a model with {blocks} blocks), but this model has {layers} "
            f"blocks: allowed shape ({layers},)"
        )
    bad = {i: v for i, v in enumerate(value.tolist()) if not _THRESHOLD.accepts(v)}
    if bad:
        return f"has values {show(list(bad.values()))} at block(s) {list(bad)}; {allowed}"
    return ""


def _and(mask: Tensor | None, other: Tensor) -> Tensor:
    """``mask & other``, where a ``None`` mask means all true (unpadded batches skip the op)."""
    return other if mask is None else mask & other


def _real_first(valid: Tensor, order: Tensor | None) -> Tensor:
    """``[B, N]`` long: `concat_order` (``None``: the identity), then each sample's padding moved
    behind its real tokens (a stable partition), so real tokens come first in their order alone.

    Args:
        valid: ``[B, N]`` bool in ``cat([A, B])`` order; order: ``[N]`` long or ``None``.
    """
    base = torch.arange(valid.shape[1], device=valid.device) if order is None else order
    padding = (~valid[:, base]).to(torch.uint8)
    return base[torch.sort(padding, dim=1, stable=True).indices]


class LTMP(BaseReducer):
    """Learned Thresholds token Merging and Pruning (Bonnaerens & Dambre, TMLR 2023).

    After each block's attention, an even-position token merges into its most similar
    odd-position token when their key cosine similarity exceeds the block's merge threshold;
    then tokens whose importance (attention received) is at or below the prune threshold are
    pruned (order and variants: ``mode``). Thresholds are learned with `tm_ltmp.fit`.
    """

    name: ClassVar[str] = "ltmp"
    config_model = LTMPConfig
    requires = frozenset({"keys", "attn"})
    description = "LTMP: learned-threshold merging and pruning, adaptive per image (Bonnaerens & Dambre, TMLR 2023)"
    merge_only = False
    adaptive = True  # per-image thresholds: counts depend on the values
    identity_config = {"merge_threshold": 2.0, "prune_threshold": -1.0}
    # Thresholds are model-specific (learn them with tm_ltmp.fit); these reduce both the tiny
    # random-init test models and trained ViTs (prune thresholds well below 1 / tokens).
    example_configs = (
        {"merge_threshold": 0.7, "prune_threshold": 0.004},
        {"mode": "prune_merge", "merge_threshold": 0.6, "prune_threshold": 0.004},
        {"mode": "merge", "merge_threshold": 0.8},
    )

    config: LTMPConfig
    merge_threshold: nn.Parameter
    prune_threshold: nn.Parameter

    def setup(self) -> None:
        cfg = self.config
        self.prop_attn = cfg.mode != "prune"
        # The original pools the class token; when the head pools the other tokens (or there
        # is no protected token), one of them must survive every block.
        self.keep_top = self.info.pool != "token" or self.info.num_protected == 0
        merge0, prune0 = DEFAULT_THRESHOLDS[cfg.mode]
        self.merge_threshold = nn.Parameter(self._per_block("merge_threshold", cfg.merge_threshold, merge0))
        self.prune_threshold = nn.Parameter(self._per_block("prune_threshold", cfg.prune_threshold, prune0))
        self._live: tuple[tuple, tuple[frozenset[str], ...]] | None = None  # (thresholds' versions, needs)

    def _per_block(self, field: str, value: float | list[float] | None, default: float) -> Tensor:
        values = per_block(self.name, field, default if value is None else value, self.info.num_layers)
        return torch.tensor([float(v) for v in values], dtype=torch.float32)

    # -- learned state -------------------------------------------------------------------------

    def threshold_parameters(self) -> list[nn.Parameter]:
        """``[merge_threshold, prune_threshold]``, each ``[L]``, for an optimiser."""
        return [self.merge_threshold, self.prune_threshold]

    def state_tensors(self) -> dict[str, Tensor]:
        return {"merge_threshold": self.merge_threshold.detach(), "prune_threshold": self.prune_threshold.detach()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy thresholds read from a file into the parameters, after checking both tensors as a
        config's thresholds are checked (`_threshold_problem`): on any error nothing changes."""
        expected = {"merge_threshold", "prune_threshold"}
        if set(tensors) != expected:
            raise InvalidConfigError(
                f"ltmp thresholds file holds tensors {sorted(tensors)}; expected exactly {sorted(expected)}"
            )
        for name in sorted(expected):
            problem = _threshold_problem(tensors[name], self.info.num_layers)
            if problem:
                raise InvalidConfigError(f"ltmp {name} in the file {problem}")
        with torch.no_grad():
            for name in expected:
                param = getattr(self, name)
                param.copy_(tensors[name].to(param))

    def to(self, device: torch.device | str) -> LTMP:
        """Move the thresholds to ``device`` in place: the same Parameter objects, so an
        optimiser built on them keeps working (build it after the move: its state, e.g.
        momentum, is created on the parameters' device at the first step)."""
        for param in self.threshold_parameters():
            if param.device != torch.device(device):
                param.data = param.data.to(device)
                if param.grad is not None:
                    param.grad = param.grad.to(device)
        return self

    def _thresholds(self, layer: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """This block's ``(merge, prune)`` thresholds; they follow the activations to their
        device on first use (one copy, then none: no per-forward host transfer)."""
        if device.type == "meta":  # shape-only runs: parameters cannot live there
            return self.merge_threshold[layer].to(device), self.prune_threshold[layer].to(device)
        if self.merge_threshold.device != device:
            self.to(device)
        return self.merge_threshold[layer], self.prune_threshold[layer]

    # -- training mode: soft masks (4.4) -------------------------------------------------------

    def soft_step(self, layer: int, x: Tensor, inputs: LayerInputs, state: TokenState) -> Tensor:
        """One block of the masked training model; updates ``state.mask`` / ``state.size``.

        ``x`` ``[B, N, C]`` keeps all ``N`` slots; merged and pruned tokens are switched off in
        the mask (straight-through, so the thresholds get gradients through the next blocks'
        attention and the FLOPs loss). Merged features use the *detached* mask (4.4).

        Padded input (``state.valid``): importance averages the real query rows only (switched-off
        real tokens included, as alone), padding is never a merge source or destination, and the
        new order puts each sample's real tokens first, in their order alone (``state.valid``
        stays true: nothing is removed, so every sample keeps its count).
        """
        mode, tau, p, valid = self.config.mode, self.config.tau, state.num_protected, state.valid
        theta_merge, theta_prune = self._thresholds(layer, x.device)
        mask = state.mask
        assert mask is not None
        if mode != "merge":
            imp = importance(inputs.attn, p, valid, keep_top=self.keep_top)
        if mode == "prune":
            state.mask = torch.where(mask.bool(), threshold_mask(imp, theta_prune, tau), mask)
            return x
        if mode == "prune_merge":
            mask = torch.where(mask.bool(), threshold_mask(imp, theta_prune, tau), mask)

        b, n, c = x.shape
        size = state.size if state.size is not None else unit_sizes(x)
        best, idx = best_match(inputs.keys, p, weight=mask.detach(), valid=valid)
        merge = threshold_mask(best, theta_merge, tau)  # [B, Na]
        w = merge.detach().unsqueeze(-1)
        mask_a, mask_b = mask[:, ::2], mask[:, 1::2]
        keep_a = torch.where(mask_a.bool(), 1 - merge, mask_a)  # a dead token stays dead

        xs = x * size.to(x.dtype)
        x_a, x_b = xs[:, ::2], xs[:, 1::2]
        s_a, s_b = size[:, ::2], size[:, 1::2]
        x_b = x_b.scatter_add(1, idx.unsqueeze(-1).expand(-1, -1, c), x_a * w.to(x_a.dtype))
        s_b = s_b.scatter_add(1, idx.unsqueeze(-1), s_a * w.to(s_a.dtype))
        size = torch.cat([s_a, s_b], dim=1)
        x = torch.cat([x_a, x_b], dim=1) / size.to(x.dtype)
        mask = torch.cat([keep_a, mask_b], dim=1)

        if mode == "merge_prune":
            # A group is as important as its most important member (merged sources' scores
            # enter through the detached mask; protected / unmerged sources contribute 0).
            imp_a, imp_b = imp[:, ::2], imp[:, 1::2]
            merged_imp = torch.where(w.squeeze(-1).bool(), imp_a, torch.zeros_like(imp_a))
            imp_b = imp_b.scatter_reduce(1, idx, merged_imp, reduce="amax")
            imp = torch.cat([imp_a, imp_b], dim=1)
            mask = torch.where(mask.bool(), threshold_mask(imp, theta_prune, tau), mask)

        order = concat_order(n, p, x.device)
        if valid is not None:
            index = _real_first(torch.cat([valid[:, ::2], valid[:, 1::2]], dim=1), order)
            x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, c))
            size, mask = size.gather(1, index.unsqueeze(-1)), mask.gather(1, index)
        elif order is not None:
            x, size, mask = x[:, order], size[:, order], mask[:, order]
        state.size = size
        state.mask = mask
        return x

    # -- inference: tokens removed, ragged batches (4.5) ---------------------------------------

    def live_needs(self) -> tuple[frozenset[str], ...]:
        """What each block reads at inference with the current thresholds (`tmcore.Runtime`):
        ``keys`` where the merge threshold can fire (``< 1``: a cosine similarity is at most 1),
        ``attn`` where the prune threshold can fire (``> 0``: importance is a mean of softmax
        probabilities, which are positive), nothing elsewhere. Blocks without ``attn`` keep the
        backbone's fused attention; blocks with neither skip scoring and matching and only
        re-order (`match`).

        The thresholds are read to the host once per change (`load`, `fit`, any in-place update
        bumps their version counters), not per forward or block.
        """
        key = tuple((id(t), t._version, t.data_ptr(), t.device) for t in self.threshold_parameters())
        cached = self._live
        if cached is None or cached[0] != key:
            merge, prune = torch.stack([self.merge_threshold.detach(), self.prune_threshold.detach()]).tolist()
            mode = self.config.mode
            needs = tuple(
                frozenset({"keys"} if mode != "prune" and m < 1 else set())
                | frozenset({"attn"} if mode != "merge" and q > 0 else set())
                for m, q in zip(merge, prune)
            )
            cached = self._live = (key, needs)
        return cached[1]

    def score(self, layer: int, inputs: LayerInputs, state: TokenState) -> Scores:
        """``metric``: keys ``[B, N, d]``, ``importance`` ``[B, N]`` (each ``None`` in blocks whose
        thresholds cannot use them, `live_needs`), ``extra["tokens"]`` ``[B, N, C]`` (shapes)."""
        needs = inputs.needs
        keys = inputs.keys if self.config.mode != "prune" and "keys" in needs else None
        imp = None
        if self.config.mode != "merge" and "attn" in needs:
            imp = importance(inputs.attn, state.num_protected, state.valid, self.keep_top)
        assert inputs.tokens is not None
        return Scores(metric=keys, importance=imp, extra={"tokens": inputs.tokens})

    def match(self, layer: int, scores: Scores, state: TokenState) -> Plan | None:
        keys, imp, tokens = scores.metric, scores.importance, scores.extra["tokens"]
        mode, valid, p = self.config.mode, state.valid, state.num_protected
        b, n = tokens.shape[:2]
        theta_merge, theta_prune = self._thresholds(layer, tokens.device)
        if mode == "prune":  # no re-ordering: a block that cannot prune has no plan
            if imp is None:
                return None
            plan = pack(torch.arange(n, device=tokens.device), _and(valid, imp > theta_prune), n)
            # one unpadded sample that keeps everything: no plan (its count is known after pack's sync)
            return None if b == 1 and valid is None and plan.num_out == n else plan
        if mode == "merge_prune":
            return self._merge_plan(keys, valid, imp, theta_merge, theta_prune, p, b, n, tokens.device)
        if mode == "merge" or imp is None:
            return self._merge_plan(keys, valid, None, theta_merge, theta_prune, p, b, n, tokens.device)
        # prune_merge: prune, pack the survivors, merge among them (parity of the packed order)
        pruned = pack(torch.arange(n, device=tokens.device), _and(valid, imp > theta_prune), n)
        packed_keys = reduce(keys, pruned) if keys is not None else None
        merged = self._merge_plan(
            packed_keys, pruned.valid, None, theta_merge, theta_prune, p, b, pruned.num_out, tokens.device
        )
        return Plan(
            keep=pruned.keep.gather(1, merged.keep),
            src=pruned.keep.gather(1, merged.src),
            src_dst=merged.src_dst,
            num_in=n,
            valid=merged.valid,
        )

    @staticmethod
    def _merge_plan(
        keys: Tensor | None,
        valid: Tensor | None,
        imp: Tensor | None,
        theta_merge: Tensor,
        theta_prune: Tensor,
        p: int,
        b: int,
        n: int,
        device: torch.device,
    ) -> Plan:
        """Merge A tokens above ``theta_merge`` into their best B token (with ``keys``), then
        (with ``imp``) prune groups whose importance (max over members) is at or below
        ``theta_prune``; the output in LTMP's ``[A, B]`` order (`output_order`). With neither,
        only that re-ordering: a static gather, no host sync (later blocks pair tokens by it).

        Args:
            keys: ``[B, N, d]`` or ``None`` (no merging); valid: ``[B, N]`` bool or ``None`` (all
                real); imp: ``[B, N]`` or ``None`` (no pruning).
        """
        order = output_order(n, p, device)
        if keys is None and imp is None:
            if valid is None:
                return Plan.prune(order.expand(b, n), n)
            return pack(order, valid[:, order], n, num_out=n)  # each sample's real tokens first
        keep_a = valid[:, ::2] if valid is not None else None
        keep_b = valid[:, 1::2] if valid is not None else None
        merged = idx = None
        if keys is not None:
            best, idx = best_match(keys, p, valid=valid)
            merged = best > theta_merge  # [B, Na]; protected / padding rows are -inf
            keep_a = _and(keep_a, ~merged)
        if imp is not None:
            imp_a, imp_b = imp[:, ::2], imp[:, 1::2]
            if merged is not None and n > 1:
                imp_b = imp_b.scatter_reduce(1, idx, imp_a.masked_fill(~merged, -math.inf), reduce="amax")
            keep_a = _and(keep_a, imp_a > theta_prune)
            keep_b = _and(keep_b, imp_b > theta_prune)
        kept = torch.empty(b, n, dtype=torch.bool, device=device)
        kept[:, ::2] = True if keep_a is None else keep_a
        kept[:, 1::2] = True if keep_b is None else keep_b
        if merged is None:
            return pack(order, kept[:, order], n)
        position = output_position(n, p, device)
        src = torch.arange(0, n, 2, device=device).expand(b, -1)
        target = torch.where(merged, position[(2 * idx + 1).clamp(max=n - 1)], -1)
        return pack(order, kept[:, order], n, src=src, src_target=target)

    def reduce(self, x: Tensor, plan: Plan, state: TokenState) -> tuple[Tensor, Tensor | None]:
        if not self.prop_attn and state.size is None:  # prune only: no sizes to carry
            return reduce(x, plan), None
        return merge_weighted(x, plan, state.size)
