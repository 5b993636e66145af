"""MCTF, multi-criteria token fusion with one-step-ahead attention (Lee et al., CVPR 2024;
github.com/mlvlab/MCTF), as a tmcore reducer: the config, the per-block schedule and the glue
between tmcore's block protocol and the pure pieces of `tm_mctf.fusion`."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from tm_mctf.fusion import attraction, bidirectional_plan, merge_count, merged_attention, received_attention
from tmcore import BaseReducer, LayerInputs, Plan, ReducerConfig, Scores, TokenState
from tmcore.config import Blocks, Bool, Choice, Integer, Number, Refused, Rule, blocks_in_range, field_type, rule_of
from tmcore.plan import merge_amax, merge_tokens

__all__ = ["MCTF", "MCTFConfig"]

_COUNT = rule_of(Integer(ge=0))
_SHARE = rule_of(Number(gt=0, lt=1))


def _check_r(value: Any) -> int | float:
    if _COUNT.accepts(value):
        return _COUNT.check(value)
    if _SHARE.accepts(value):
        return _SHARE.check(value)
    raise Refused


RValue = field_type(
    Rule(
        "an int >= 0 (tokens each merging block removes) or a number in (0, 1) (that fraction of the block's "
        "unprotected tokens)",
        _check_r,
    ),
    int | float,
)

Pooling = Literal["attn_size", "size", "max", "mean"]


class MCTFConfig(ReducerConfig):
    r: RValue = Field(
        default=16,
        description="tokens each merging block removes (int >= 0), or a fraction in (0, 1) of its unprotected "
        "tokens; at least 10 tokens stay and at most half of the unprotected ones merge",
    )
    layers: Blocks(optional=True) = Field(
        default=None,
        description="0-based indices of the merging blocks; None: every block but the first (blocks 1-11 of a "
        "12-block model)",
    )
    one_step_ahead: Integer(ge=0, le=2) = Field(
        default=1,
        description="1: merge at the block start and reuse its attention, merged, for the merged tokens; "
        "2: merge at the block start, then recompute attention; 0: merge after the block",
    )
    tau_sim: Number(ge=0) = Field(default=1.0, description="similarity temperature (exponent 1/tau; 0 disables)")
    tau_info: Number(ge=0) = Field(default=20.0, description="informativeness temperature (exponent 1/tau; 0 disables)")
    tau_size: Number(ge=0) = Field(default=40.0, description="size temperature (exponent 1/tau; 0 disables)")
    bidirection: Bool = Field(default=True, description="two-step matching: r // 2 tokens A -> B, the rest B -> A")
    pooling: Choice(Pooling) = Field(
        default="attn_size",
        description="how a merged group's features combine: 'attn_size' (weighted by attention received x size), "
        "'size', 'max' (elementwise) or 'mean'",
    )
    prop_attn: Bool = Field(default=True, description="proportional attention (+log(size) on attention logits)")


class MCTF(BaseReducer):
    """Multi-criteria token fusion. In each merging block: an attraction score of every A token
    (even position) to every B token (odd) multiplies similarity of the residual-stream features,
    informativeness (tokens that receive little attention attract) and size (small tokens
    attract); a two-step bipartite matching merges ``r // 2`` A tokens into B tokens, then
    ``r - r // 2`` B tokens into the remaining A tokens; groups are averaged weighted by attention
    received x size (``pooling``), sizes summed.

    Position: with ``one_step_ahead`` 1 (default) or 2 the block merges its input before its own
    attention (tmcore position ``start``), reading that block's attention of the unreduced
    tokens; with 1 the attention of the merged tokens is that map merged along both axes (keys
    summed, queries pooled like the features), with 2 it is recomputed. With 0 the block output
    is merged (position ``layer``) with the block's attention.

    Protected prefix tokens (class, distillation, registers) never merge and stay in front.
    Padded batches: every sample merges what its real tokens give, exactly as alone (ragged plans
    with a static slot count, no host synchronisation).
    """

    name: ClassVar[str] = "mctf"
    config_model = MCTFConfig
    requires = frozenset({"attn"})
    position: ClassVar[str] = "start"  # "layer" for one_step_ahead=0 (set per instance in setup)
    description = "MCTF: multi-criteria token fusion with one-step-ahead attention (CVPR 2024)"
    identity_config = {"r": 0}
    example_configs = ({"r": 8}, {"r": 0.3, "layers": [0, 2]})

    config: MCTFConfig

    def setup(self) -> None:
        cfg, info = self.config, self.info
        layers = list(range(1, info.num_layers)) if cfg.layers is None else cfg.layers
        blocks_in_range(self.name, "layers", layers, info.num_layers, cfg.layers)
        self.active = frozenset(layers) if cfg.r else frozenset()
        self.position = "layer" if cfg.one_step_ahead == 0 else "start"
        self.prop_attn = cfg.prop_attn
        # the attention is read for informativeness, attention-weighted pooling, or to reuse it
        self.reads_attn = bool(cfg.tau_info) or cfg.pooling == "attn_size" or cfg.one_step_ahead == 1

    def needs(self, layer: int) -> frozenset[str]:
        return self.requires if layer in self.active and self.reads_attn else frozenset()

    def score(self, layer: int, inputs: LayerInputs, state: TokenState) -> Scores | None:
        """``metric``: the tokens ``[B, N, C]`` (the residual stream: the block input, or its output
        at ``one_step_ahead=0``); ``attn``: this block's probabilities ``[B, H, N, N]`` where read."""
        if layer not in self.active:
            return None
        return Scores(metric=inputs.tokens, attn=inputs.attn if self.reads_attn else None)

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None:
        if scores is None:
            return None
        cfg, p, valid = self.config, state.num_protected, state.valid
        x, attn = scores.metric, scores.attn
        r = merge_count(x.shape[1], cfg.r, p)  # padded batches: the most any sample merges
        if r == 0:
            return None
        r1 = r // 2 if cfg.bidirection else r
        each = None
        if valid is not None:
            r_each = merge_count(valid.sum(1), cfg.r, p)
            r1_each = r_each // 2 if cfg.bidirection else r_each
            each = (r1_each, r_each - r1_each)
        with torch.no_grad():
            received = None if attn is None else received_attention(attn.detach(), valid)
            score = attraction(x.detach(), received, state.size, cfg.tau_sim, cfg.tau_info, cfg.tau_size, p, valid)
            plan = bidirectional_plan(score, r1, r - r1, p, valid, each, num_out=x.shape[1] - r)
            if cfg.pooling == "attn_size":
                weight = received.unsqueeze(-1) * (state.size if state.size is not None else 1)
                if valid is not None:  # padding never joins a real group; 1 keeps its own slot finite
                    weight = weight.masked_fill(~valid.unsqueeze(-1), 1)
                plan = plan.with_weight(weight)
            elif cfg.pooling == "mean":
                plan = plan.with_equal_weights()
        if cfg.one_step_ahead == 1:
            state.given_attn = merged_attention(attn, plan, state.size, amax=cfg.pooling == "max")
        return plan

    def reduce(self, x: Tensor, plan: Plan, state: TokenState) -> tuple[Tensor, Tensor | None]:
        if self.config.pooling == "max":
            return merge_amax(x, plan, state.size)
        return merge_tokens(x, plan, state.size)
