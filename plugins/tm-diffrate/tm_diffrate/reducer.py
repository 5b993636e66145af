"""DiffRate (Chen et al., ICCV 2023): per block, sort tokens by the class token's attention, prune
the tail and merge the next band into the most similar kept tokens, with per-block kept counts
that a differentiable search learns against a FLOPs target.

Inference (``model.eval()``, and training with ``search=False``) is `DiffRate.score` /
`DiffRate.match`: the official evaluation block as one Plan per block, fixed counts from the
config (no host synchronisation, ``torch.compile(fullgraph=True)``). With ``search=True`` the
reducer owns per-block logits over candidate kept counts and, in training mode, runs
`DiffRate._soft_step`: nothing is removed; straight-through masks switch tokens off inside
attention (`tm_diffrate.search` drives it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from tm_diffrate.ops import (
    band_plan,
    candidates,
    class_importance,
    expected_kept,
    importance_order,
    keep_probability,
)
from tm_diffrate.schedules import KEEP_ALL, PUBLISHED, SCHEDULE_NAMES
from tmcore import BaseReducer, InvalidConfigError, LayerInputs, Plan, ReducerConfig, Scores, TokenState
from tmcore.config import Bool, Choice, Integer, PerBlock, per_block, show
from tmcore.matching import best_partner
from tmcore.plan import merge_tokens, unit_sizes

__all__ = ["DiffRate", "DiffRateConfig", "Schedule"]

Count = Integer(ge=1, note="tokens kept, the protected prefix (class token) included")

Schedule = tuple[tuple[int, ...], tuple[int, ...]]
"""``(prune, merge)``: kept counts per block."""

_NO_SCHEDULE = (
    "give the kept counts as prune=[...] and merge=[...] (one int per block, or one int for every block), "
    f"a published schedule as schedule=NAME (one of {', '.join(SCHEDULE_NAMES)}; {KEEP_ALL!r} keeps every "
    "token), or schedule_file=PATH (a file tm_diffrate.search wrote)"
)


class DiffRateConfig(ReducerConfig):
    prune: PerBlock(Count) | None = Field(
        default=None,
        description=(
            "tokens kept after pruning in each block, class token included (an int for every block or one "
            "per block); with merge"
        ),
    )
    merge: PerBlock(Count) | None = Field(
        default=None,
        description=(
            "tokens kept after merging in each block, class token included (an int for every block or one "
            "per block); with prune"
        ),
    )
    schedule: Choice(Literal[SCHEDULE_NAMES]) | None = Field(
        default=None,
        description=(
            "a published DeiT schedule by name (deit-s-2.9, ...: DeiT-T/S/B at 224 px only), or 'keep-all' "
            "(every token in every block: the identity)"
        ),
    )
    schedule_file: str | None = Field(
        default=None,
        description="path of a schedule tm_diffrate.search wrote (its .safetensors file or .json card)",
    )
    search: Bool = Field(
        default=False,
        description=(
            "learn the kept counts: in training mode soft masks replace token removal (tm_diffrate.search "
            "sets it); False: training mode removes tokens as inference does (fine-tuning)"
        ),
    )
    prune_granularity: Integer(ge=1) = Field(
        default=4, description="search only: spacing of the candidate prune counts (the official main.py's 4)"
    )
    merge_granularity: Integer(ge=1) = Field(
        default=4, description="search only: spacing of the candidate merge counts (the official main.py's 4)"
    )


def read_schedule_file(path: str | Path) -> Schedule:
    """``(prune, merge)`` from a `tm_diffrate.search` output: its tmcore reducer file
    (``.safetensors``) or its JSON card (keys ``prune`` and ``merge``).

    Raises:
        InvalidConfigError: the file is missing, unreadable, or holds no DiffRate schedule.
    """
    where = f"invalid config for reducer 'diffrate': schedule_file={show(str(path))}"
    path = Path(path)
    if not path.is_file():
        raise InvalidConfigError(f"{where}: no such file")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidConfigError(f"{where}: not readable JSON ({exc})") from None
    else:
        from tmcore.api import read_saved

        try:
            name, data, _ = read_saved(path, tensors=False)
        except InvalidConfigError as exc:
            raise InvalidConfigError(f"{where}: {exc}") from None
        if name != "diffrate":
            raise InvalidConfigError(f"{where}: the file holds reducer {name!r}, not 'diffrate'")
    prune, merge = (data.get(k) if isinstance(data, dict) else None for k in ("prune", "merge"))
    ok = all(isinstance(v, list) and v and all(type(c) is int and c >= 1 for c in v) for v in (prune, merge))
    if not ok:
        raise InvalidConfigError(
            f"{where}: the file holds no schedule; allowed: 'prune' and 'merge' lists of ints >= 1 "
            f"(got prune={show(prune)}, merge={show(merge)})"
        )
    return tuple(prune), tuple(merge)


class DiffRate(BaseReducer):
    """DiffRate's inference block with a fixed schedule (Chen et al., ICCV 2023).

    After each block's attention the tokens are ordered by the attention the class token pays
    them (head mean, ``log(size)`` bias included): the protected prefix, then descending. The
    first ``prune[l]`` are kept; ranks ``[merge[l], prune[l])`` are merged, each into its most
    similar (cosine of the post-attention tokens) of ranks ``[p, merge[l])``, as an unweighted
    mean with the destination; a merged token adds ``size * similarity`` to its destination's
    size. Counts include the prefix and clip at the current length (the effective count is the
    running minimum). Proportional attention is always on. Needs a class token.
    """

    name: ClassVar[str] = "diffrate"
    config_model = DiffRateConfig
    requires = frozenset({"cls_attn", "attn"})  # attn: the soft-masked probabilities of a search only
    requires_class_token = True
    merge_only = False
    description = "DiffRate: class-attention prune + merge with searched per-block counts (Chen et al., ICCV 2023)"
    identity_config = {"schedule": KEEP_ALL}
    # One count for every block, so they fit any depth (the test matrix's 4-block models and a
    # 12-block DeiT alike): prune and merge, prune only, merge only (a prune count above the
    # length clips).
    example_configs = (
        {"prune": 48, "merge": 40},
        {"prune": 48, "merge": 48},
        {"prune": 1000, "merge": 40},
    )

    # the search's attention: the official softmax_with_policy (every query keeps its own key)
    mask_eps: ClassVar[float] = 1e-6
    mask_self_loop: ClassVar[bool] = True

    config: DiffRateConfig
    prune_logits: nn.Parameter
    merge_logits: nn.Parameter

    def setup(self) -> None:
        cfg, info = self.config, self.info
        self.prop_attn = True  # the official block always adds log(size)
        self.prune_kept, self.merge_kept = self._resolve(cfg)
        self.keep_all = all(c >= info.num_tokens for c in self.prune_kept + self.merge_kept)
        self._needs = frozenset() if self.keep_all else frozenset({"cls_attn"})
        self._live = (self._needs,) * info.num_layers
        if cfg.search:
            self._setup_search()

    def _resolve(self, cfg: DiffRateConfig) -> Schedule:
        """The schedule as ``(prune, merge)`` per block, from whichever form the config gives."""
        info, layers = self.info, self.info.num_layers
        given = [name for name in ("schedule", "schedule_file") if getattr(cfg, name) is not None]
        if cfg.prune is not None or cfg.merge is not None:
            given.insert(0, "prune/merge")
        if len(given) != 1:
            what = "no schedule" if not given else f"{len(given)} schedules ({', '.join(given)})"
            raise InvalidConfigError(f"invalid config for reducer 'diffrate': {what}; {_NO_SCHEDULE}")
        if cfg.schedule == KEEP_ALL:
            return (info.num_tokens,) * layers, (info.num_tokens,) * layers
        if cfg.schedule is not None:
            prune, merge = self._published(cfg.schedule)
        elif cfg.schedule_file is not None:
            prune, merge = read_schedule_file(cfg.schedule_file)
        else:
            if cfg.prune is None or cfg.merge is None:
                missing = "merge" if cfg.merge is None else "prune"
                raise InvalidConfigError(
                    f"invalid config for reducer 'diffrate': {missing} is missing; give prune and merge together "
                    "(the kept counts after pruning and after merging)"
                )
            prune, merge = (self._per_block(name, getattr(cfg, name)) for name in ("prune", "merge"))
        for name, counts in (("prune", prune), ("merge", merge)):
            if len(counts) != layers:
                raise InvalidConfigError(
                    f"invalid config for reducer 'diffrate': {name} has {len(counts)} counts ({show(list(counts))}) "
                    f"but the model has {layers} blocks; allowed: one int per block, or one int for every block"
                )
            low = [c for c in counts if c <= info.num_protected]
            if low:
                raise InvalidConfigError(
                    f"invalid config for reducer 'diffrate': {name}={show(list(counts))} keeps {low[0]} token(s) in "
                    f"a block, but the model has {info.num_protected} protected token(s) (class token first); "
                    f"allowed: counts >= {info.num_protected + 1} (the prefix and at least one other token)"
                )
        return tuple(prune), tuple(merge)

    def _per_block(self, name: str, value: int | list[int]) -> tuple[int, ...]:
        return tuple(per_block(self.name, name, value, self.info.num_layers))

    def _published(self, name: str) -> Schedule:
        """A published DeiT schedule, refused on a model it was not searched for."""
        info = self.info
        entry = PUBLISHED[name]
        if (info.num_layers, info.num_tokens, info.num_protected) != (12, 197, 1):
            raise InvalidConfigError(
                f"invalid config for reducer 'diffrate': schedule={name!r} is {entry.model}'s published schedule, "
                f"for 12 blocks of 197 tokens (196 patches and a class token); this model has {info.num_layers} "
                f"blocks of {info.num_tokens} tokens ({info.num_protected} protected); give prune and merge for it, "
                "or search a schedule with tm_diffrate.search"
            )
        return entry.prune, entry.merge

    # -- inference: one Plan per block -------------------------------------------------------

    def needs(self, layer: int) -> frozenset[str]:
        if self.config.search:  # soft-mask attention probabilities in training mode
            return frozenset({"cls_attn", "attn"})
        return self._needs

    def live_needs(self) -> tuple[frozenset[str], ...]:
        """Inference reads only the class-attention row (``attn`` is for the search's soft
        masks), so inference keeps fused attention in every block."""
        return self._live

    def score(self, layer: int, inputs: LayerInputs, state: TokenState) -> Scores | None:
        """``importance`` ``[B, N - p]`` (class attention) and ``metric``, the tokens ``[B, N, C]``
        (the merge similarity), where the block reduces, else ``None``."""
        if "cls_attn" not in inputs.needs:
            return None
        assert inputs.tokens is not None
        return Scores(metric=inputs.tokens, importance=class_importance(inputs.cls_attn, state.num_protected))

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None:
        if scores is None:
            return None
        importance, tokens = scores.importance, scores.metric
        p, valid = state.num_protected, state.valid
        order = importance_order(importance, p, None if valid is None else ~valid[:, p:])
        return band_plan(order, tokens, self.prune_kept[layer], self.merge_kept[layer], p, valid)

    def reduce(self, x: Tensor, plan: Plan, state: TokenState) -> tuple[Tensor, Tensor | None]:
        size = state.size
        if plan.size_scale is None and size is None:  # pure prune / re-order: sizes stay 1
            size = unit_sizes(x)
        return merge_tokens(x, plan, size)

    # -- search: learnable kept counts and the soft-mask block --------------------------------

    def _setup_search(self) -> None:
        info, cfg = self.info, self.config
        patches = info.num_tokens - info.num_protected
        if patches < 1:
            raise InvalidConfigError(
                f"invalid config for reducer 'diffrate': search=True needs unprotected tokens; the model has "
                f"{info.num_tokens} tokens, {info.num_protected} protected"
            )
        self.patches = patches
        self.prune_candidates = candidates(patches, cfg.prune_granularity)
        self.merge_candidates = candidates(patches, cfg.merge_granularity)
        # zeros: the official start (uniform over the candidates; block 0 never reduces)
        layers = info.num_layers
        self.prune_logits = nn.Parameter(torch.zeros(layers, len(self.prune_candidates)))
        self.merge_logits = nn.Parameter(torch.zeros(layers, len(self.merge_candidates)))
        # the runtime trains a reducer with a `soft_step` through soft masks: only a searching one
        self.soft_step = self._soft_step

    def arch_parameters(self) -> list[nn.Parameter]:
        """``[prune_logits, merge_logits]`` (each ``[L, K]``), for an optimiser; search only."""
        self._require_search("arch_parameters")
        return [self.prune_logits, self.merge_logits]

    def _require_search(self, what: str) -> None:
        if not self.config.search:
            raise InvalidConfigError(
                f"diffrate {what}: the reducer was applied with search=False; apply it with search=True "
                "(tm_diffrate.search does)"
            )

    def kept(self, layer: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """``(prune kept, merge kept)`` of block ``layer`` as straight-through tensors (integer
        values, prefix included, gradients to the logits); block 0 keeps every token."""
        self._require_search("kept")
        p = self.info.num_protected
        if layer == 0:
            full = torch.tensor(float(self.patches + p), device=device or self.prune_logits.device)
            return full, full
        prune = expected_kept(self._logits(self.prune_logits, device)[layer], self._cands("prune", device), p)
        merge = expected_kept(self._logits(self.merge_logits, device)[layer], self._cands("merge", device), p)
        return prune, merge

    def searched_schedule(self) -> Schedule:
        """The integer schedule the logits stand for now (one host read of the logits)."""
        counts = [self.kept(layer) for layer in range(self.info.num_layers)]
        prune = tuple(int(round(float(c[0]))) for c in counts)
        merge = tuple(int(round(float(c[1]))) for c in counts)
        return prune, merge

    def _cands(self, which: str, device: torch.device | None) -> Tensor:
        cands = self.prune_candidates if which == "prune" else self.merge_candidates
        return cands if device is None else cands.to(device)

    def _logits(self, param: nn.Parameter, device: torch.device | None) -> Tensor:
        if device is None or param.device == device or device.type == "meta":
            return param if device is None or device.type != "meta" else param.to(device)
        param.data = param.data.to(device)  # follow the activations once, in place (optimisers keep it)
        return param

    def _masks(self, layer: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``[length]`` keep probabilities of the block's prune and merge counts."""
        p = self.info.num_protected
        if layer == 0:
            # Block 0 never reduces (gradient 0), but its mask stays in the autograd graph: the
            # runtime takes a mask without one in a later block for a graph that reentrant
            # checkpointing cut.
            ones = torch.ones(length, device=device) + 0 * self._logits(self.prune_logits, device)[0].sum()
            return ones, ones
        return (
            keep_probability(self._logits(self.prune_logits, device)[layer], self._cands("prune", device), p, length),
            keep_probability(self._logits(self.merge_logits, device)[layer], self._cands("merge", device), p, length),
        )

    def _soft_step(self, layer: int, x: Tensor, inputs: LayerInputs, state: TokenState) -> Tensor:
        """The official search-time block on ``x`` ``[B, N, C]``: nothing is removed.

        Tokens are re-ordered by class attention (switched-off tokens last); ranks
        ``[prune_kept, n)`` are switched off in ``state.mask`` (``n``: the alive tokens), ranks
        ``[merge_kept, min(n, prune_kept))`` are averaged into their most similar head token
        (unweighted mean; sizes ``+ max(size * sim, 1)``) and switched off. Masks are
        straight-through: value 0 / 1, gradient through the keep probabilities. Each sample
        counts its own alive tokens (padding never is), so a padded batch acts per sample.
        """
        mask = state.mask
        assert mask is not None
        b, n, c = x.shape
        p, device = state.num_protected, x.device
        size = state.size if state.size is not None else unit_sizes(x)
        alive = mask.detach() > 0.5
        importance = class_importance(inputs.attn[:, :, 0], p)
        order = importance_order(importance, p, ~alive[:, p:])
        x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, c))
        size, mask = size.gather(1, order.unsqueeze(-1)), mask.gather(1, order)
        count = alive.sum(1, keepdim=True)  # [B, 1]: alive tokens, now ranks [0, count)

        prune_kept, merge_kept = self.kept(layer, device)
        prune_prob, merge_prob = self._masks(layer, n, device)
        ranks = torch.arange(n, device=device)
        kp, km = prune_kept.detach(), merge_kept.detach()
        off = (ranks >= kp) & (ranks < count)
        prune_mask = (~off).to(mask.dtype) + (prune_prob - prune_prob.detach()).to(mask.dtype)
        mask = torch.where(kp < count, mask * prune_mask, mask)
        mid = torch.minimum(count, kp.long())  # [B, 1] tokens after pruning

        merging = km < mid  # [B, 1]
        with torch.no_grad():
            unit = x / x.norm(dim=-1, keepdim=True)
            heads = (ranks >= p) & (ranks < km)  # [N]: destinations
            sim, dst = best_partner((unit @ unit.transpose(-1, -2)).masked_fill(~heads, -math.inf))  # [B, N]
            source = (ranks >= km) & (ranks < mid) & merging  # [B, N]
        w = source.unsqueeze(-1).to(x.dtype)
        index = dst.unsqueeze(-1)
        total = x.scatter_add(1, index.expand(-1, -1, c), x * w)
        members = torch.ones_like(w).scatter_add(1, index, w)
        x = total / members  # heads: the mean with their sources; every other rank unchanged
        in_band = (ranks < mid) & merging  # sizes of ranks [0, mid) are clamped at 1 (training only)
        scaled = torch.where(source.unsqueeze(-1), size * sim.unsqueeze(-1).to(size.dtype), size)
        scaled = torch.where(in_band.unsqueeze(-1), scaled.clamp(min=1), size)
        size = scaled.scatter_add(1, index, scaled * source.unsqueeze(-1).to(size.dtype))
        off = (ranks >= km) & (ranks < mid)
        merge_mask = (~off).to(mask.dtype) + (merge_prob - merge_prob.detach()).to(mask.dtype)
        mask = torch.where(merging, mask * merge_mask, mask)
        state.size, state.mask = size, mask
        return x

    # -- learned state --------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, Tensor]:
        """The search logits while searching (``search=True``); nothing otherwise: a fixed
        schedule is all in the config."""
        if not self.config.search:
            return {}
        return {"prune_logits": self.prune_logits.detach(), "merge_logits": self.merge_logits.detach()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if not self.config.search:
            return super().load_state_tensors(tensors)
        expected = {"prune_logits": self.prune_logits, "merge_logits": self.merge_logits}
        if set(tensors) != set(expected):
            raise InvalidConfigError(
                f"diffrate search file holds tensors {sorted(tensors)}; expected exactly {sorted(expected)}"
            )
        for name, param in expected.items():
            value = tensors[name]
            if not value.is_floating_point() or value.shape != param.shape or not torch.isfinite(value).all():
                raise InvalidConfigError(
                    f"diffrate {name} in the file has dtype {value.dtype} and shape {tuple(value.shape)}; allowed: "
                    f"finite floats of shape {tuple(param.shape)} (this model's blocks x candidate counts)"
                )
        with torch.no_grad():
            for name, param in expected.items():
                param.copy_(tensors[name].to(param))
