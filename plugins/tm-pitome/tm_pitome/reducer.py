"""PiToMe (docs/algorithms.md section 3): energy-ranked token merging with per-layer procedures.

Config and defaults live here; the method itself is `tm_pitome.energy` and `tm_pitome.merge`.
Defaults follow the original's patch for the model's family (see `PiToMe.setup`).

Padded batches (``state.valid`` set, text models): every sample removes ``r_i`` tokens computed
from its own token count, with energies over its own real tokens, as it would alone; the plan
is ragged with a static size (`tm_pitome.merge.padded_bounds`), so nothing syncs with the host.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor

from tm_pitome.merge import (
    VARIANTS,
    Variant,
    bsm_plan_padded,
    energy_scores,
    padded_bounds,
    padded_plan,
    removed,
    removed_each,
)
from tmcore import BaseReducer, InvalidConfigError, Plan, ReducerConfig, Scores, TokenState
from tmcore.config import (
    Bool,
    Choice,
    Number,
    OptionalBool,
    PerBlock,
    Rule,
    check_pair,
    field_type,
    pair_json,
    per_block,
    rule_of,
)
from tmcore.matching import bipartite_soft_matching
from tmcore.state import LayerInputs

__all__ = ["PiToMe", "PiToMeConfig", "TEXT_LAYERS", "CLIP_FAMILY", "CLIP_BSM_LAST"]

TEXT_LAYERS = 3
"""Text models reduce only their first three layers by default (the original's BERT patches)."""

CLIP_FAMILY = "transformers.clip"
"""The Hugging Face CLIP vision tower (the adapter's family name): the original's ``clip_hf`` patch."""

CLIP_BSM_LAST = 12
"""``clip_hf`` runs ``bsm`` in encoder layers ``0..12`` and ``pitome`` after: the original hard-codes
index 12, written for LLaVA-1.5's 24-layer ViT-L/14 (a 12-layer tower runs ``bsm`` throughout)."""

Ratio = PerBlock(
    Number(
        ge=0.5,
        le=1,
        note="the fraction of unprotected tokens a block keeps; PiToMe is undefined below 0.5: each block "
        "pairs up 2r of its T tokens, so it can remove at most half of them",
    )
)

_MARGIN_VALUE = Number(ge=-1, le=1)
_MARGIN, _MARGINS = rule_of(_MARGIN_VALUE), rule_of(PerBlock(_MARGIN_VALUE))
_MARGIN_NAMES = ("start", "end")


def _check_margin(value: Any) -> float | list[float] | tuple[float, float]:
    pair = check_pair(value, _MARGIN_NAMES, (_MARGIN, _MARGIN))
    return _MARGINS.check(value) if pair is None else pair


Margin = field_type(
    Rule(
        f"{_MARGINS.allowed}, or a pair (start, end) of them for the line margin_l = start + (end - start) * l / L "
        "over blocks l = 0..L-1 (the original's 0.75 - 0.75 * l / L is (0.75, 0.0))",
        _check_margin,
    ),
    float | list[float] | tuple[float, float],
    json=pair_json(_MARGIN_NAMES),
)

VariantSchedule = PerBlock(Choice(Variant))


class PiToMeConfig(ReducerConfig):
    ratio: Ratio = Field(
        description="fraction of unprotected tokens each block keeps, 0.5 <= ratio <= 1, or a per-block list",
    )
    margin: Margin | None = Field(
        default=None,
        description="energy margin in [-1, 1]: a number, a per-block list, or (start, end) for "
        "start + (end - start) * l / L; default (0.75, 0) for vision, 0.9 - 0.25 l / L for text",
    )
    alpha: Number(gt=0, note="the ELU's saturation value") = Field(
        default=1.0, description="ELU alpha of the vision energy, > 0"
    )
    variant: VariantSchedule | None = Field(
        default=None,
        description="'pitome', 'pitome_bsm', 'pitome_text' or 'bsm', or a per-block list; default as the original: "
        "pitome_bsm in the first ceil(L/2) blocks then pitome (MAE: the reverse; text: pitome_text; "
        "HF CLIP: bsm in blocks 0-12 then pitome)",
    )
    prop_attn: Bool = Field(
        default=False, description="proportional attention (+log(size) on attention logits), off as in the original"
    )
    size_weighted: OptionalBool = Field(
        default=None,
        description="average merged features by token size (sizes carried across blocks); default on, "
        "off for text as in the original's BERT patches",
    )


class PiToMe(BaseReducer):
    """PiToMe, spectrum-preserving token merging. In each block, after attention: score every
    unprotected token by the energy of its neighbourhood (head-mean keys), then merge
    ``floor(T - ratio * T)`` tokens by the block's procedure, highest-energy tokens first;
    features are averaged by size. Protected prefix tokens never merge. On Hugging Face CLIP
    (`CLIP_FAMILY`) it follows the original's ``clip_hf`` patch: after the whole encoder layer
    (``position = "layer"``), plain-mean merging, ``bsm`` then ``pitome``.
    """

    name: ClassVar[str] = "pitome"
    config_model = PiToMeConfig
    requires = frozenset({"keys"})
    description = "PiToMe: energy-ranked token merging, spectrum-preserving (Tran et al., NeurIPS 2024)"
    identity_config = {"ratio": 1.0}
    example_configs = ({"ratio": 0.95}, {"ratio": 0.925}, {"ratio": 0.9})

    config: PiToMeConfig
    position: str = "attention"
    """Where blocks reduce (`tmcore.reducer.POSITIONS`): ``layer`` on HF CLIP, as the original."""

    def setup(self) -> None:
        cfg, info = self.config, self.info
        n_layers = info.num_layers
        text = info.modality == "text"
        clip = info.family == CLIP_FAMILY
        if clip:  # the original's clip_hf merges the hidden state after each whole encoder layer
            self.position = "layer"
        self.prop_attn = cfg.prop_attn
        # plain means: the original's text patches (sizes reset) and clip_hf (merge_mean)
        self.size_weighted = (not text and not clip) if cfg.size_weighted is None else cfg.size_weighted

        if isinstance(cfg.ratio, list):
            ratios = self._per_block("ratio", cfg.ratio)
        elif text:  # the original's text patches reduce only the first three layers
            ratios = [cfg.ratio] * min(TEXT_LAYERS, n_layers) + [1.0] * max(n_layers - TEXT_LAYERS, 0)
        else:
            ratios = [cfg.ratio] * n_layers
        self.ratios: tuple[float, ...] = tuple(ratios)

        margin = cfg.margin
        if margin is None:  # the original's hard-coded schedules, computed as it computes them
            start, drop = (0.9, 0.25) if text else (0.9, 0.9) if clip else (0.75, 0.75)
            margins = [start - drop * (i / n_layers) for i in range(n_layers)]
        elif isinstance(margin, list):
            margins = self._per_block("margin", margin)
        elif isinstance(margin, tuple):
            start, end = margin
            margins = [start - (start - end) * (i / n_layers) for i in range(n_layers)]
        else:
            margins = [margin] * n_layers
        self.margins: tuple[float, ...] = tuple(margins)

        variant = cfg.variant
        if variant is None:
            half = math.ceil(n_layers / 2)
            if text:
                variants = ["pitome_text"] * n_layers
            elif clip:
                variants = ["bsm" if i <= CLIP_BSM_LAST else "pitome" for i in range(n_layers)]
            elif info.mae:  # the original's MAE patch inverts the DeiT order
                variants = ["pitome"] * half + ["pitome_bsm"] * (n_layers - half)
            else:
                variants = ["pitome_bsm"] * half + ["pitome"] * (n_layers - half)
        elif isinstance(variant, list):
            variants = self._per_block("variant", variant)
        else:
            variants = [variant] * n_layers
        self.variants: tuple[str, ...] = tuple(variants)

        for i, (v, m) in enumerate(zip(self.variants, self.margins)):
            if v == "pitome_text" and m >= 1.0:
                raise InvalidConfigError(
                    f"margin: block {i} uses 'pitome_text' with margin {m!r}; allowed: margin < 1 "
                    "(its Gaussian kernel has width 1 - margin)"
                )

    def _per_block(self, field: str, values: list[Any]) -> list[Any]:
        return per_block(self.name, field, values, self.info.num_layers)

    def token_counts(self, num_tokens: int | Tensor, num_protected: int | None = None) -> list[Any]:
        """Tokens entering each block, then the count leaving the last block (static).

        ``num_tokens`` a ``[B]`` long tensor (the real lengths of a padded batch): ``[B]``
        tensors, each sample's counts alone, as a trace of the padded batch reports them.
        """
        p = self.info.num_protected if num_protected is None else num_protected
        counts = [num_tokens]
        for variant, ratio in zip(self.variants, self.ratios):
            t = counts[-1] - p
            if isinstance(t, Tensor):
                counts.append(counts[-1] - removed_each(variant, t, ratio, p))
            else:
                counts.append(counts[-1] - removed(variant, t, ratio, p))
        return counts

    def needs(self, layer: int) -> frozenset[str]:
        return self.requires if self.ratios[layer] < 1.0 else frozenset()

    def score(self, layer: int, inputs: LayerInputs, state: TokenState) -> Scores | None:
        """``bsm``: the keys as ``metric``; the energy procedures: ``similarity`` ``[B, T, T]``
        of the unprotected tokens and their energy ``order`` ``[B, T]`` (padding last). ``count``:
        tokens to remove (padded: the most any sample removes, ``each`` per sample, ``slots`` the
        static output size)."""
        ratio = self.ratios[layer]
        if ratio >= 1.0:
            return None
        keys = inputs.keys
        p, variant = state.num_protected, self.variants[layer]
        if state.valid is not None:
            return self._score_padded(layer, keys, state.valid, p)
        r = removed(variant, keys.shape[1] - p, ratio, p)
        if r <= 0:  # too few tokens left to remove one; the original would only re-order them
            return None
        if variant == "bsm":
            return Scores(metric=keys, count=r)
        sim, order = energy_scores(keys[:, p:], self.margins[layer], variant, self.config.alpha)
        return Scores(similarity=sim, order=order, count=r)

    def _score_padded(self, layer: int, keys: Tensor, valid: Tensor, p: int) -> Scores | None:
        """`score` on a padded batch: ``r_i`` from each sample's own real tokens, energies over
        them only, padding ranked last; the static bounds come from the padded length."""
        ratio, variant = self.ratios[layer], self.variants[layer]
        width, slots = padded_bounds(variant, keys.shape[1] - p, ratio, p)
        if width == 0:  # no sample can remove a token
            return None
        real = valid[:, p:]
        each = removed_each(variant, real.sum(1), ratio, p)
        if variant == "bsm":
            return Scores(metric=keys, count=width, each=each, slots=slots)
        sim, order = energy_scores(keys[:, p:], self.margins[layer], variant, self.config.alpha, real)
        return Scores(similarity=sim, order=order, count=width, each=each, slots=slots)

    def match(self, layer: int, scores: Scores | None, state: TokenState) -> Plan | None:
        if scores is None:
            return None
        variant, p = self.variants[layer], state.num_protected
        with torch.no_grad():
            if scores.each is not None:
                assert state.valid is not None
                if variant == "bsm":
                    plan = bsm_plan_padded(scores.metric, scores.each, state.valid, p, scores.count, scores.slots)
                else:
                    assert scores.order is not None
                    plan = padded_plan(
                        variant, scores.similarity, scores.order, scores.each, state.valid, scores.count, scores.slots
                    )
            elif variant == "bsm":
                plan = bipartite_soft_matching(scores.metric, scores.count, p)
            else:
                assert scores.order is not None
                plan = VARIANTS[variant](scores.similarity, scores.order, scores.count, p)
        if self.size_weighted:
            return plan
        # Plain mean of each group as in the original's text patches; the sizes are still carried
        # (summed) so that pooling, tracing and proportional attention see the true counts.
        return plan.with_equal_weights()
