"""ATC, Agglomerative Token Clustering (Haurum et al., ECCV 2024; github.com/JoakimHaurum/ATC).

At a block that reduces, after attention, the unprotected tokens are clustered bottom-up on the
cosine distances of their head-mean keys until a fixed number of clusters is left; every cluster
becomes one token, the mean of its members (size-weighted, or plain where the official code
merges without sizes), its size the sum of theirs. The clustering is `tm_atc.cluster`; counts,
weights and the Plan are here.

Two schemes, as in the official code:

- fine-tuned models (``ATC_setup``, the default): at the ``i``-th listed block (in depth order)
  ``int(P * keep_rate ** (i + 1))`` clusters, ``P`` the unprotected tokens entering the model;
- off the shelf (``SSLBackbone_setup``, ``r`` given): ``r`` tokens fewer in every block, a
  ToMe-style per-block schedule.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor

from tm_atc.cluster import Linkage, agglomerate, cluster_plan, cosine_distances, padded_cluster_plan
from tmcore import BaseReducer, InvalidConfigError, Plan, ReducerConfig, Scores, TokenState
from tmcore.compiling import per_shape
from tmcore.config import Blocks, Choice, Number, OptionalBool, Rule, blocks_in_range, field_type, pair_json, rule_of
from tmcore.matching import real_tokens
from tmcore.schedule import PruneSchedule, RSchedule, RValue, parse_r

__all__ = ["ATC", "ATCConfig", "DEFAULT_KEEP_RATE", "cluster_counts", "default_layers", "most_merges"]

DEFAULT_KEEP_RATE = 0.9
"""The keep rate of the official README's DeiT fine-tuning example."""


def _or_none(tp: Any, none: str, py_type: Any, json: Any = None) -> Any:
    """The field type ``tp`` (a `tmcore.config` type) that also takes ``None``, which means ``none``."""
    rule = rule_of(tp)
    return field_type(
        Rule(f"None ({none}) or {rule.allowed}", lambda v: None if v is None else rule.check(v)), py_type, json
    )


KeepRate = _or_none(Number(gt=0, le=1), f"{DEFAULT_KEEP_RATE} unless r is given", float | None)
OptionalR = _or_none(RSchedule, "the keep-rate scheme", RValue | None, json=pair_json(("r", "inflect")))


def default_layers(num_layers: int) -> list[int]:
    """The blocks that reduce by default: ``[L // 4, L // 2, 3 L // 4]`` (distinct), the paper's
    ``[3, 6, 9]`` for 12 blocks and the same quarter points for any other depth (``[1, 2, 3]``
    for 4 blocks, ``[6, 12, 18]`` for 24)."""
    return sorted({num_layers * q // 4 for q in (1, 2, 3)})


def cluster_counts(num_tokens: int, keep_rate: float, num_listed: int) -> list[int]:
    """Unprotected tokens after each listed block for ``num_tokens`` unprotected input tokens.

    The official ``int(P * keep_rate ** (i + 1))`` at the ``i``-th listed block, kept at one
    cluster at least (a short input alone could round to none) and at most what the block has.

    Returns:
        ``[num_tokens, K_0, K_1, ...]``, ``num_listed + 1`` counts.
    """
    counts = [num_tokens]
    for i in range(num_listed):
        counts.append(min(max(int(num_tokens * keep_rate ** (i + 1)), 1), counts[-1]))
    return counts


@per_shape(maxsize=256)
@torch.compiler.assume_constant_result  # pure Python on ints: compiled graphs take its value
def most_merges(max_tokens: int, keep_rate: float, index: int) -> int:
    """The most merges any sample of up to ``max_tokens`` unprotected input tokens makes in the
    listed block ``index`` (`cluster_counts`): the static loop bound for a padded batch."""
    return max(
        c[index] - c[index + 1] for c in (cluster_counts(q, keep_rate, index + 1) for q in range(max_tokens + 1))
    )


class ATCConfig(ReducerConfig):
    keep_rate: KeepRate = Field(
        default=None,
        description=f"0 < keep_rate <= 1: int(P * keep_rate ** (i + 1)) clusters at the i-th listed block, P the "
        f"unprotected input tokens (the official --reduction_ratio); None: {DEFAULT_KEEP_RATE} unless r is given",
    )
    layers: Blocks(optional=True) = Field(
        default=None,
        description="0-based indices of the blocks that cluster (keep-rate scheme), distinct, below the model's "
        "block count; None: [L//4, L//2, 3L//4], the paper's [3, 6, 9] for 12 blocks",
    )
    linkage: Choice(Linkage) = Field(
        default="average", description="cluster distance: 'average' (mean over pairs), 'complete' (max), 'single' (min)"
    )
    prop_attn: OptionalBool = Field(
        default=None,
        description="proportional attention (+log(size) on attention logits); None: the official default, off for "
        "the keep-rate scheme (which then merges plain means) and on for r",
    )
    r: OptionalR = Field(
        default=None,
        description="off-the-shelf variant: tokens removed in every block, int >= 0, a per-block list, or "
        "(r, inflect); None: the keep-rate scheme",
    )

    @model_validator(mode="after")
    def _one_scheme(self) -> ATCConfig:
        if self.r is not None and (self.keep_rate is not None or self.layers is not None):
            given = ", ".join(
                f"{k}={getattr(self, k)!r}" for k in ("keep_rate", "layers") if getattr(self, k) is not None
            )
            raise ValueError(
                f"r={self.r!r} selects the off-the-shelf scheme (r tokens removed in every block), which takes no "
                f"{given}; allowed: r alone, or keep_rate and layers without r"
            )
        return self


class ATC(BaseReducer):
    """Agglomerative Token Clustering. At each reducing block, after attention, cluster the
    unprotected tokens bottom-up (``linkage``) on ``1 - cos`` of their head-mean keys; each
    cluster becomes one token (sizes summed), after the protected prefix, in the order of the
    clusters' smallest token positions.

    Keep-rate scheme (default): ``int(P * keep_rate ** (i + 1))`` clusters at the ``i``-th
    listed block (at least one); without ``prop_attn`` clusters are plain means of their
    members, as in the official code. ``r`` scheme: ``r`` tokens fewer per block (capped at all
    unprotected tokens but one, with a `ScheduleClampWarning`), size-weighted means.

    Padded batches: each sample clusters its own real tokens to its own count, as alone.
    """

    name: ClassVar[str] = "atc"
    config_model = ATCConfig
    requires = frozenset({"keys"})
    description = "ATC: agglomerative clustering of tokens on keys (Haurum et al., ECCV 2024)"
    identity_config = {"keep_rate": 1.0}
    # sized for the 4-block, 64-token test models: two blocks and few merge steps first (the
    # conformance suite compiles the first, unrolling every step), the default blocks at a strong
    # rate, and the off-the-shelf r
    example_configs = (
        {"keep_rate": 0.9, "layers": [1, 3]},
        {"keep_rate": 0.5},
        {"r": 8},
    )

    config: ATCConfig

    def setup(self) -> None:
        cfg, info = self.config, self.info
        self.linkage: Linkage = cfg.linkage
        self.by_rate = cfg.r is None
        if self.by_rate:
            self.keep_rate = DEFAULT_KEEP_RATE if cfg.keep_rate is None else cfg.keep_rate
            layers = default_layers(info.num_layers) if cfg.layers is None else cfg.layers
            blocks_in_range(self.name, "layers", layers, info.num_layers)
            # the i-th reducing block in depth order gets keep_rate ** (i + 1)
            self.index = {layer: i for i, layer in enumerate(sorted(layers))}
            self._check_counts(info.num_tokens - info.num_protected)
            self.prop_attn = False if cfg.prop_attn is None else cfg.prop_attn
        else:
            self.schedule = PruneSchedule(parse_r(info.num_layers, cfg.r), info.num_tokens, info.num_protected)
            self.prop_attn = True if cfg.prop_attn is None else cfg.prop_attn
        # The official fine-tuned model resets sizes after every block when proportional
        # attention is off, so each of its merges is a plain mean; its off-the-shelf patch always
        # merges by size.
        self.equal_weights = self.by_rate and not self.prop_attn

    def _check_counts(self, tokens: int) -> None:
        """Refuse a keep rate that leaves no cluster at the model's own input size."""
        n = len(self.index)
        if n and tokens > 0 and int(tokens * self.keep_rate**n) < 1:
            raise InvalidConfigError(
                f"invalid config for reducer 'atc': keep_rate={self.keep_rate!r} leaves "
                f"int({tokens} * keep_rate ** {n}) = 0 clusters at the last of {n} reducing blocks for this model's "
                f"{tokens} unprotected tokens; allowed: a keep_rate of about {tokens ** (-1 / n):.4g} or more, "
                "or fewer layers"
            )

    def needs(self, layer: int) -> frozenset[str]:
        active = layer in self.index if self.by_rate else self.schedule.active(layer)
        return self.requires if active else frozenset()

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None:
        if scores is None or scores.metric is None:
            return None
        keys = scores.metric  # [B, N, d] head-mean keys
        p, valid = state.num_protected, state.valid
        n = keys.shape[1]
        t = n - p
        if valid is None:
            target = self._clusters(layer, state, t)
            if target >= t:
                return None
            with torch.no_grad():
                label = agglomerate(cosine_distances(keys[:, p:]), t - target, self.linkage)
                plan = cluster_plan(label, target, p)
        else:
            bound = self._padded_bound(layer, state, t)
            if bound is None:
                return None
            steps, num_out = bound
            with torch.no_grad():
                each = self._padded_merges(layer, state, real_tokens(valid, p))
                label = agglomerate(cosine_distances(keys[:, p:], valid[:, p:]), steps, self.linkage, each)
                plan = padded_cluster_plan(label, valid, p, num_out)
        return plan.with_equal_weights() if self.equal_weights else plan

    def _clusters(self, layer: int, state: TokenState, tokens: int) -> int:
        """Unprotected tokens after block ``layer`` for ``tokens`` entering it (no padding)."""
        if not self.by_rate:
            return tokens - self.schedule(state.num_input)[layer]
        i = self.index[layer]
        return cluster_counts(state.num_input - state.num_protected, self.keep_rate, i + 1)[-1]

    def _padded_bound(self, layer: int, state: TokenState, tokens: int) -> tuple[int, int] | None:
        """``(merge steps, output slots)`` that cover every sample of a padded batch whose
        samples hold at most ``tokens`` unprotected tokens here; ``None``: none merges."""
        p = state.num_protected
        if not self.by_rate:
            r = self.schedule(state.num_input)[layer]
            return (r, p + tokens - r) if r else None
        i = self.index[layer]
        longest = state.num_input - p  # the padded length bounds every sample's input
        steps = min(most_merges(longest, self.keep_rate, i), tokens)
        if steps == 0:
            return None
        return steps, p + min(cluster_counts(longest, self.keep_rate, i + 1)[-1], tokens)

    def _padded_merges(self, layer: int, state: TokenState, tokens: Tensor) -> Tensor:
        """``[B]`` long: merges of every sample of a padded batch holding ``tokens`` ``[B]`` real
        unprotected tokens here, as alone."""
        if not self.by_rate:
            r = self.schedule(state.num_input)[layer]
            return (tokens - 1).clamp(min=0, max=r)  # all unprotected tokens but one at most, as alone
        # the official count from each sample's own input length, in double precision as Python's
        # int(P * k ** (i + 1)) computes it
        first = state.input_valid if state.input_valid is not None else state.valid
        inputs = real_tokens(first, state.num_protected)
        rate = self.keep_rate ** (self.index[layer] + 1)
        target = torch.floor(inputs.double() * rate).long().clamp(min=1)
        return (tokens - torch.minimum(target, tokens)).clamp(min=0)
