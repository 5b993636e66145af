"""ToMeCIS (docs/algorithms.md section 5): ToMe's bipartite soft matching and schedule, with every
merged group averaged by class importance (the class token's attention to a token times the norm
of its value vector) instead of by size. Sizes are still summed for proportional attention.
The method is `class_importance` and `ToMeCIS.match`; matching and merging are tmcore's."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from tmcore import (
    BaseReducer,
    BipartiteSchedule,
    LayerInputs,
    Plan,
    ReducerConfig,
    RSchedule,
    Scores,
    TokenState,
    bipartite_soft_matching,
)
from tmcore.config import Bool
from tmcore.schedule import parse_r

__all__ = ["ToMeCIS", "ToMeCISConfig", "class_importance"]


def class_importance(cls_attn: Tensor, values: Tensor) -> Tensor:
    """The class importance score of every token (5.2), not normalised (it cancels in a mean).

    Args:
        cls_attn: ``[B, H, N]`` the class token's attention row per head (bias included).
        values: ``[B, H, N, d]`` the attention's values.

    Returns:
        ``[B, N]``: head-mean class attention x L2 norm of the head-mean value vector.
    """
    return cls_attn.mean(dim=1) * values.mean(dim=1).norm(dim=-1)


class ToMeCISConfig(ReducerConfig):
    r: RSchedule = Field(
        description="tokens merged per block: int >= 0, a per-block list, or (r, inflect) with -1 <= inflect <= 1",
    )
    prop_attn: Bool = Field(
        default=True, description="proportional attention (+log(size) on attention logits), on as in the original"
    )


class ToMeCIS(BaseReducer):
    """Token merging with class importance score. In every block, after attention: ToMe's
    bipartite soft matching of head-mean keys merges ``r`` tokens (protected prefix tokens never
    merge); each merged group is the mean of its tokens weighted by their class importance,
    recomputed in every block and not multiplied by size; sizes are summed and add ``log(size)``
    to later attention logits. Needs a class token.

    ``r`` beyond half of a block's unprotected tokens is capped with a `ScheduleClampWarning`.

    Padded batches: each sample merges ``min(r, T_i // 2)`` of its ``T_i`` real unprotected tokens
    (the core's matching with ``state.valid``), exactly as alone. The class importance needs no
    mask: padding keys get probability 0 from the attention bias, the score is not normalised
    over tokens, and a padding token never joins a real group, so its weight is never used.
    """

    name: ClassVar[str] = "tomecis"
    config_model = ToMeCISConfig
    requires = frozenset({"keys", "cls_attn", "values"})
    requires_class_token = True
    description = "ToMeCIS: ToMe's matching, merges weighted by class importance score (IECON 2023)"
    identity_config = {"r": 0}
    example_configs = ({"r": 4}, {"r": 8}, {"r": 12})

    config: ToMeCISConfig

    def setup(self) -> None:
        cfg, info = self.config, self.info
        self.prop_attn = cfg.prop_attn
        self.schedule = BipartiteSchedule(
            parse_r(info.num_layers, cfg.r, self.name), info.num_tokens, info.num_protected
        )

    def needs(self, layer: int) -> frozenset[str]:
        return self.requires if self.schedule.active(layer) else frozenset()

    def score(self, layer: int, inputs: LayerInputs, state: TokenState) -> Scores | None:
        if not inputs.needs:
            return None
        cls_attn = inputs.cls_attn
        # in float32 at least: half-precision products of ~1/N attentions lose their low bits
        dtype = torch.promote_types(cls_attn.dtype, torch.float32)
        # metric: head-mean keys (the matching); importance: class importance (the merge weight)
        return Scores(metric=inputs.keys, importance=class_importance(cls_attn.to(dtype), inputs.values.to(dtype)))

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None:
        r = self.schedule(state.num_input)[layer]
        if r == 0 or scores is None:
            return None
        plan = bipartite_soft_matching(scores.metric, r, state.num_protected, valid=state.valid)
        return plan.with_weight(scores.importance.unsqueeze(-1))
