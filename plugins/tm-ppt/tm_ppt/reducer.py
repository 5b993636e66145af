"""PPT (docs/algorithms.md section 6): at a few chosen blocks every image removes ``r`` tokens, either
by pooling (ToMe's bipartite merging, sizes summed) or by pruning (keeping its most significant
tokens), whichever its significance scores call for: evenly spread attention (low variance) means
duplicated content, so pool; a few dominant tokens (high variance) mean inattentive ones, so prune.

Both branches are planned for the whole batch and one is picked per image with
`tmcore.plan.select`: one fixed-shape plan, no host synchronisation, no sub-batches. The method is
`significance` and `PPT.match`; matching, pruning order and merging are tmcore's.

Padded batches (``state.valid``): significance is normalised, and its variance taken, over each
sample's real tokens only; both branches are the core's padded plans (each sample removes
``min(r, T_i // 2)``, as alone), ragged with equal shapes, so `select` still mixes them.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from tmcore import (
    BaseReducer,
    BipartiteSchedule,
    LayerInputs,
    Plan,
    ReducerConfig,
    Scores,
    TokenState,
    bipartite_soft_matching,
)
from tmcore.config import Blocks, Bool, Integer, Number, PerBlock, blocks_in_range, per_block, show
from tmcore.matching import prune_lowest
from tmcore.plan import select

__all__ = ["PPT", "PPTConfig", "significance", "masked_variance"]


def significance(cls_attn: Tensor, values: Tensor, num_protected: int, valid: Tensor | None = None) -> Tensor:
    """ATS significance of the unprotected tokens, normalised to sum 1 per image (6.2).

    Args:
        cls_attn: ``[B, H, N]`` the class token's attention row per head (bias included).
        values: ``[B, H, N, d]`` the attention's values.
        num_protected: ``p``, the length of the protected prefix (left out).
        valid: ``[B, N]`` bool padding mask: padding scores 0 and is left out of the sum.

    Returns:
        ``[B, N - p]``: class attention summed over heads x L2 norm of the value vector over all
        heads (``C``-dim), divided by its sum over the unprotected (real) tokens.
    """
    score = cls_attn[:, :, num_protected:].sum(dim=1) * torch.linalg.vector_norm(
        values[:, :, num_protected:], dim=(1, 3)
    )
    if valid is not None:  # the bias already gives padding 0 attention; this makes it exact
        score = score.masked_fill(~valid[:, num_protected:], 0)
    return score / score.sum(dim=-1, keepdim=True)


def masked_variance(values: Tensor, valid: Tensor) -> Tensor:
    """Unbiased variance of each row over its valid entries, as ``values[i, valid[i]].var()``.

    Args:
        values: ``[B, T]``; valid: ``[B, T]`` bool.

    Returns:
        ``[B]``; NaN for a row with one valid entry (like ``Tensor.var``).
    """
    count = valid.sum(dim=1).to(values.dtype)
    mean = values.masked_fill(~valid, 0).sum(dim=1) / count
    dev = (values - mean.unsqueeze(1)).masked_fill_(~valid, 0)
    return dev.square_().sum(dim=1) / (count - 1)


RValue = PerBlock(Integer(ge=0, note="tokens a listed block removes"), per="listed block")

Threshold = Number(
    ge=-math.inf,
    le=math.inf,
    note="images whose significance variance is below it pool, the others prune; inf: every image pools, "
    "0 or -inf: every image prunes",
)

Layers = Blocks()


class PPTConfig(ReducerConfig):
    r: RValue = Field(
        default=50, description="tokens removed at each listed block: int >= 0, or one int per entry of layers"
    )
    layers: Layers = Field(
        default_factory=lambda: [3, 6, 9],
        description="0-based indices of the blocks that reduce, distinct, each below the model's block count",
    )
    threshold: Threshold = Field(
        default=7e-5,
        description="significance-variance threshold: below it an image pools, else it prunes; "
        "inf: always pool, 0 or -inf: always prune; not NaN",
    )
    prop_attn: Bool = Field(
        default=True,
        description="proportional attention (+log(size) on attention logits) and size-weighted pooling, "
        "on as in the original; off: plain means",
    )


class PPT(BaseReducer):
    """Token Pruning and Pooling. At each listed block, after attention, every image removes
    ``r`` tokens (capped at half of its unprotected tokens, with a `ScheduleClampWarning`):
    images whose significance scores vary less than ``threshold`` pool them (bipartite soft
    matching, size-weighted, output in ToMe's order), the others prune them (keeping the
    protected prefix, then the most significant tokens in descending order). Needs a class token.
    Padded batches: each sample as alone (scores, variance and ``r`` from its real tokens).
    """

    name: ClassVar[str] = "ppt"
    config_model = PPTConfig
    requires = frozenset({"keys", "cls_attn", "values"})
    requires_class_token = True
    merge_only = False
    description = "PPT: per-image token pooling or pruning by significance variance (Wu et al., 2023)"
    identity_config = {"layers": []}  # r=0 would keep the default layers, which need 10 blocks
    # The defaults (r=50 at blocks 3, 6, 9) are for 12-block ViTs; these fit any model with 4 or
    # more blocks: a mixed, an all-pooling and an all-pruning setting on random-init models.
    example_configs = (
        {"r": 8, "layers": [0, 2], "threshold": 1e-3},
        {"r": 8, "layers": [1, 3], "threshold": math.inf},
        {"r": 6, "layers": [0, 1, 2, 3], "threshold": 0.0},
    )

    config: PPTConfig

    def setup(self) -> None:
        cfg, info = self.config, self.info
        blocks_in_range(self.name, "layers", cfg.layers, info.num_layers)
        self.prop_attn = cfg.prop_attn
        each = per_block(self.name, "r", cfg.r, len(cfg.layers), "listed block", f"layers={show(cfg.layers)}")
        r_at = dict(zip(cfg.layers, each))
        self.schedule = BipartiteSchedule(
            [r_at.get(layer, 0) for layer in range(info.num_layers)], info.num_tokens, info.num_protected
        )
        # Variances are >= 0: at inf every image pools, at <= 0 every image prunes, so the
        # branch that can never be taken is neither planned nor fed.
        self.pool_only = cfg.threshold == math.inf
        self.prune_only = cfg.threshold <= 0

    def needs(self, layer: int) -> frozenset[str]:
        if not self.schedule.active(layer):
            return frozenset()
        if self.pool_only:
            return frozenset({"keys"})
        if self.prune_only:
            return frozenset({"cls_attn", "values"})
        return self.requires

    def score(self, layer: int, inputs: LayerInputs, state: TokenState) -> Scores | None:
        """``metric``: head-mean keys (pooling), ``None`` where no image can pool; ``importance``:
        ``[B, N - p]`` significance (pruning and the choice), ``None`` where every image pools."""
        if not inputs.needs:
            return None
        keys = None if self.prune_only else inputs.keys
        sig = None
        if not self.pool_only:
            cls_attn = inputs.cls_attn
            dtype = torch.promote_types(cls_attn.dtype, torch.float32)  # variances of ~1/N scores
            sig = significance(cls_attn.to(dtype), inputs.values.to(dtype), state.num_protected, state.valid)
        return Scores(metric=keys, importance=sig)

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None:
        r = self.schedule(state.num_input)[layer]
        if r == 0 or scores is None:
            return None
        p, valid = state.num_protected, state.valid
        if self.pool_only:
            plan = bipartite_soft_matching(scores.metric, r, p, valid)
        else:
            sig = scores.importance
            prune = prune_lowest(F.pad(sig, (p, 0)), r, p, valid)
            if self.prune_only:
                plan = prune
            else:
                # [B], unbiased as the original; over each sample's real tokens on a padded batch
                var = sig.var(dim=1) if valid is None else masked_variance(sig, valid[:, p:])
                plan = select(var < self.config.threshold, bipartite_soft_matching(scores.metric, r, p, valid), prune)
        if not self.prop_attn:  # the original then merges with all-ones sizes: a plain mean
            plan = plan.with_equal_weights()
        return plan
