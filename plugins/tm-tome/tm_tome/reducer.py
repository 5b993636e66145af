"""ToMe (docs/algorithms.md section 2): bipartite soft matching on head-mean keys, size-weighted
merging, proportional attention. The whole method is `ToMe.match`; the rest is tmcore's."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from tmcore import (
    BaseReducer,
    BipartiteSchedule,
    Plan,
    ReducerConfig,
    RSchedule,
    Scores,
    TokenState,
    bipartite_soft_matching,
)
from tmcore.config import OptionalBool
from tmcore.schedule import block_r, parse_r


class ToMeConfig(ReducerConfig):
    r: RSchedule = Field(
        description="tokens merged per block: int >= 0, a per-block list, or (r, inflect) with -1 <= inflect <= 1",
    )
    prop_attn: OptionalBool = Field(
        default=None,
        description="proportional attention (+log(size) on attention logits); default on, off for MAE weights",
    )


class ToMe(BaseReducer):
    """Token Merging. In every block, after attention, merge ``r`` tokens by bipartite soft
    matching of head-mean keys (protected prefix tokens never merge), average merged features
    by size, and add ``log(size)`` to later attention logits.

    ``r`` beyond half of a block's unprotected tokens is capped with a `ScheduleClampWarning`.
    On a padded batch each sample merges ``min(r, T_i // 2)`` of its ``T_i`` real unprotected
    tokens, exactly as alone (the cap the schedule applies to a sample of its own length).

    Block scope (diffusion models, `tmcore.reducer.SCOPES`): every block merges ``r`` of its own
    tokens (capped at half of them) around its self-attention, by the keys of that attention, and
    spreads the result back; ``r`` does not accumulate from block to block.
    """

    name: ClassVar[str] = "tome"
    config_model = ToMeConfig
    requires = frozenset({"keys"})
    description = "ToMe: bipartite soft matching on keys, size-weighted merging (Bolya et al., ICLR 2023)"
    identity_config = {"r": 0}
    example_configs = ({"r": 4}, {"r": 8}, {"r": 12})
    scopes = frozenset({"model", "block"})

    config: ToMeConfig

    def setup(self) -> None:
        cfg, info = self.config, self.info
        # The original defaults to proportional attention except for off-the-shelf MAE models.
        # (and where the adapter cannot feed log(size) to attention: SD3's joint attention)
        self.prop_attn = (not info.mae and info.size_bias) if cfg.prop_attn is None else cfg.prop_attn
        r_list = parse_r(info.num_layers, cfg.r, self.name)
        self.r_list = tuple(r_list)
        block_scope = info.scope == "block"  # every block merges its own tokens: no schedule over blocks
        self.schedule = None if block_scope else BipartiteSchedule(r_list, info.num_tokens, info.num_protected)

    def needs(self, layer: int) -> frozenset[str]:
        return self.requires if self.r_list[layer] > 0 else frozenset()

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None:
        if self.schedule is None:  # block scope: this block's own tokens
            r = 0 if scores is None else block_r(self.r_list[layer], layer, scores.metric.shape[1], state.num_protected)
        else:
            r = self.schedule(state.num_input)[layer]
        if r == 0 or scores is None:
            return None
        return bipartite_soft_matching(scores.metric, r, state.num_protected, valid=state.valid)
