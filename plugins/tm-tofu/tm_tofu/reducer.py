"""ToFu (Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and Token Merging",
WACV 2024): ToMe's bipartite soft matching in every block; where the rest of the network is far
from linear (the first blocks) matched sources are pruned, further on they are merged with MLERP,
which keeps a merged token's norm instead of shrinking it as an average does."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from tmcore import (
    BaseReducer,
    BipartiteSchedule,
    InvalidConfigError,
    Plan,
    ReducerConfig,
    RSchedule,
    Scores,
    TokenState,
    bipartite_soft_matching,
)
from tmcore.config import Choice, Integer, OptionalBool
from tmcore.plan import carry_through, merge_mlerp, merge_tokens, merge_weighted, reduce
from tmcore.schedule import parse_r

__all__ = ["ToFu", "ToFuConfig", "prune_sources", "reimplementation_merge"]


class ToFuConfig(ReducerConfig):
    r: RSchedule = Field(
        description="tokens removed per block: int >= 0, a per-block list, or (r, inflect) with -1 <= inflect <= 1",
    )
    switch: Integer(ge=-1) | None = Field(
        default=None,
        description="the last block that prunes (later blocks merge); -1 merges everywhere; default: "
        "half the depth, L // 2",
    )
    merge_rule: Choice(Literal["mlerp", "reimplementation"]) = Field(
        default="mlerp",
        description="'mlerp' (the paper: direction of the size-weighted mean, norm of the largest member) or "
        "'reimplementation' (the public re-implementations' rule: plain mean rescaled by largest / destination norm)",
    )
    prop_attn: OptionalBool = Field(
        default=None,
        description="proportional attention (+log(size) on attention logits); default on, off for MAE weights",
    )


def prune_sources(plan: Plan) -> Plan:
    """The pruning variant of a matching plan: the matched sources are dropped instead of joining
    their destination (which keeps its value and size); output order and count are unchanged."""
    return replace(plan, src_dst=torch.full_like(plan.src_dst, -1))


def reimplementation_merge(x: Tensor, plan: Plan, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """The merge rule of the public ToFu re-implementations (OpenToMe, PiToMe's ``algo/tofu``):
    the plain mean of each group (sizes ignored), rescaled by the group's largest norm over the
    norm the destination had before merging. Groups of one token stay as they are; sizes are
    summed as in `tmcore.plan.merge_tokens`.

    Args:
        x: ``[B, N, C]``; plan: a merging plan; size: ``[B, N, 1]`` or ``None``.

    Returns:
        ``([B, M, C], [B, M, 1])``.
    """
    new_size = merge_tokens(x[..., :1], plan, size)[1]
    mean = merge_weighted(x, plan)[0]
    norm = x.norm(dim=-1, keepdim=True)
    largest = reduce(norm, plan, "amax")
    own = carry_through(norm, plan, "first")
    members = reduce(torch.ones_like(norm), plan)
    return torch.where(members > 1, mean * (largest / own), mean), new_size


class ToFu(BaseReducer):
    """Token Fusion. In every block, after attention, ToMe's bipartite soft matching of head-mean
    keys picks ``r`` source tokens and their destinations (protected prefix tokens never take
    part). In blocks ``0 .. switch`` the sources are pruned; after ``switch`` they merge into
    their destinations by MLERP. Sizes are summed (pruned tokens take theirs with them) and feed
    proportional attention, as in ToMe.
    """

    name: ClassVar[str] = "tofu"
    config_model = ToFuConfig
    requires = frozenset({"keys"})
    description = "ToFu: ToMe matching, prune early and MLERP-merge late (Kim et al., WACV 2024)"
    identity_config = {"r": 0}
    example_configs = ({"r": 4}, {"r": 8}, {"r": 12})
    merge_only = False

    config: ToFuConfig

    def setup(self) -> None:
        cfg, info = self.config, self.info
        self.prop_attn = (not info.mae) if cfg.prop_attn is None else cfg.prop_attn
        last = info.num_layers - 1
        self.switch = info.num_layers // 2 if cfg.switch is None else cfg.switch
        if self.switch > last:
            raise InvalidConfigError(
                f"invalid config for reducer 'tofu': switch={cfg.switch} for a model with {info.num_layers} blocks; "
                f"allowed: -1 (merge in every block) to {last} (prune in every block)"
            )
        self.schedule = BipartiteSchedule(
            parse_r(info.num_layers, cfg.r, self.name), info.num_tokens, info.num_protected
        )

    def needs(self, layer: int) -> frozenset[str]:
        return self.requires if self.schedule.active(layer) else frozenset()

    def prunes(self, layer: int) -> bool:
        """Whether block ``layer`` drops its matched sources (else it merges them)."""
        return layer <= self.switch

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None:
        r = self.schedule(state.num_input)[layer]
        if r == 0 or scores is None:
            return None
        plan = bipartite_soft_matching(scores.metric, r, state.num_protected, valid=state.valid)
        return prune_sources(plan) if self.prunes(layer) else plan

    def reduce(self, x: Tensor, plan: Plan, state: TokenState) -> tuple[Tensor, Tensor | None]:
        if self.config.merge_rule == "reimplementation":
            return reimplementation_merge(x, plan, state.size)
        return merge_mlerp(x, plan, state.size)
