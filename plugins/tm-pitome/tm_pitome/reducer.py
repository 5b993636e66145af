"""PiToMe (ALGORITHMS.md section 3): energy-ranked token merging with per-layer procedures.

Config and defaults live here; the method itself is `tm_pitome.energy` and `tm_pitome.merge`.
Defaults follow the original's patch for the model's family (see `PiToMe.setup`).

Padded batches (``state.valid`` set, text models): every sample removes ``r_i`` tokens computed
from its own token count, with energies over its own real tokens, as it would alone; the plan
is ragged with a static size (`tm_pitome.merge.padded_bounds`), so nothing syncs with the host.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, NamedTuple, get_args

import torch
from pydantic import Field, PlainSerializer, PlainValidator
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
from tmcore import BaseReducer, InvalidConfigError, Plan, ReducerConfig, TokenState
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

_VARIANT_NAMES = get_args(Variant)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ratio ---------------------------------------------------------------------------------------

_RATIO_ALLOWED = (
    "a number with 0.5 <= ratio <= 1 (the fraction of unprotected tokens each block keeps), or a "
    "list of such numbers, one per block; PiToMe is undefined below 0.5 (each block pairs up 2r of "
    "its T tokens, so it can remove at most half of them)"
)


def _validate_ratio(value: Any) -> float | list[float]:
    if _number(value) and 0.5 <= value <= 1.0:
        return float(value)
    if isinstance(value, list) and value and all(_number(v) and 0.5 <= v <= 1.0 for v in value):
        return [float(v) for v in value]
    raise ValueError(f"must be {_RATIO_ALLOWED}")


Ratio = Annotated[float | list[float], PlainValidator(_validate_ratio)]

# margin --------------------------------------------------------------------------------------

_MARGIN_ALLOWED = (
    "a number in [-1, 1] (every block), a list of such numbers (one per block), or a pair "
    "(start, end) of such numbers for the line margin_l = start + (end - start) * l / L over "
    "blocks l = 0..L-1 (the original's 0.75 - 0.75 * l / L is (0.75, 0.0))"
)


def _validate_margin(value: Any) -> float | list[float] | tuple[float, float]:
    def ok(v: Any) -> bool:
        return _number(v) and -1.0 <= v <= 1.0

    if ok(value):
        return float(value)
    if isinstance(value, list) and value and all(ok(v) for v in value):
        return [float(v) for v in value]
    if isinstance(value, dict) and set(value) == {"start", "end"}:  # the JSON form of a pair
        value = (value["start"], value["end"])
    if isinstance(value, tuple) and len(value) == 2 and all(ok(v) for v in value):
        return (float(value[0]), float(value[1]))
    raise ValueError(f"must be {_MARGIN_ALLOWED}")


def _serialize_margin(value: Any) -> Any:
    return {"start": value[0], "end": value[1]} if isinstance(value, tuple) else value


Margin = Annotated[
    float | list[float] | tuple[float, float],
    PlainValidator(_validate_margin),
    PlainSerializer(_serialize_margin, when_used="json"),
]

# variant -------------------------------------------------------------------------------------

_VARIANT_ALLOWED = (
    f"one of {', '.join(repr(v) for v in _VARIANT_NAMES)} (every block), or a list of those names, one per block"
)


def _validate_variant(value: Any) -> str | list[str]:
    if isinstance(value, str) and value in _VARIANT_NAMES:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v in _VARIANT_NAMES for v in value):
        return list(value)
    raise ValueError(f"must be {_VARIANT_ALLOWED}")


VariantSchedule = Annotated[str | list[str], PlainValidator(_validate_variant)]


def _validate_alpha(value: Any) -> float:
    if _number(value) and value > 0:
        return float(value)
    raise ValueError("must be a finite number > 0 (the ELU's saturation value)")


def _validate_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ValueError("must be true, false or None (the default for the model's family)")


def _validate_prop_attn(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("must be true or false")


class PiToMeConfig(ReducerConfig):
    ratio: Ratio = Field(
        description="fraction of unprotected tokens each block keeps, 0.5 <= ratio <= 1, or a per-block list",
    )
    margin: Margin | None = Field(
        default=None,
        description="energy margin in [-1, 1]: a number, a per-block list, or (start, end) for "
        "start + (end - start) * l / L; default (0.75, 0) for vision, 0.9 - 0.25 l / L for text",
    )
    alpha: Annotated[float, PlainValidator(_validate_alpha)] = Field(
        default=1.0, description="ELU alpha of the vision energy, > 0"
    )
    variant: VariantSchedule | None = Field(
        default=None,
        description="'pitome', 'pitome_bsm', 'pitome_text' or 'bsm', or a per-block list; default as the original: "
        "pitome_bsm in the first ceil(L/2) blocks then pitome (MAE: the reverse; text: pitome_text; "
        "HF CLIP: bsm in blocks 0-12 then pitome)",
    )
    prop_attn: Annotated[bool, PlainValidator(_validate_prop_attn)] = Field(
        default=False, description="proportional attention (+log(size) on attention logits), off as in the original"
    )
    size_weighted: Annotated[bool | None, PlainValidator(_validate_bool)] = Field(
        default=None,
        description="average merged features by token size (sizes carried across blocks); default on, "
        "off for text as in the original's BERT patches",
    )


class _Scores(NamedTuple):
    """One layer's score: the similarity and the energy order of the non-protected tokens
    (``bsm``: the keys, no order). On a padded batch, also each sample's count and the bounds."""

    metric: Tensor  # [B, T, T] similarity; bsm: [B, N, d] keys
    order: Tensor | None  # [B, T] by descending energy (padding last); bsm: None
    r: int  # tokens to remove; padded: the most any sample removes (r_max)
    each: Tensor | None = None  # padded: [B] long r_i
    valid: Tensor | None = None  # padded: [B, N] bool
    slots: int = 0  # padded: static output size (m_max)


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
    """Where blocks reduce (`tmcore.runtime.POSITIONS`): ``layer`` on HF CLIP, as the original."""

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
        n_layers = self.info.num_layers
        if len(values) != n_layers:
            raise InvalidConfigError(
                f"{field}: a per-block list of length {len(values)} ({values!r}) for a model with {n_layers} "
                f"blocks; allowed: exactly {n_layers} entries, or a single value for every block"
            )
        return list(values)

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

    def score(self, layer: int, inputs: LayerInputs, state: TokenState) -> _Scores | None:
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
            return _Scores(keys, None, r)
        sim, order = energy_scores(keys[:, p:], self.margins[layer], variant, self.config.alpha)
        return _Scores(sim, order, r)

    def _score_padded(self, layer: int, keys: Tensor, valid: Tensor, p: int) -> _Scores | None:
        """`score` on a padded batch: ``r_i`` from each sample's own real tokens, energies over
        them only, padding ranked last; the static bounds come from the padded length."""
        ratio, variant = self.ratios[layer], self.variants[layer]
        width, slots = padded_bounds(variant, keys.shape[1] - p, ratio, p)
        if width == 0:  # no sample can remove a token
            return None
        real = valid[:, p:]
        each = removed_each(variant, real.sum(1), ratio, p)
        if variant == "bsm":
            return _Scores(keys, None, width, each, valid, slots)
        sim, order = energy_scores(keys[:, p:], self.margins[layer], variant, self.config.alpha, real)
        return _Scores(sim, order, width, each, valid, slots)

    def match(self, layer: int, scores: _Scores | None, state: TokenState) -> Plan | None:
        if scores is None:
            return None
        variant, p = self.variants[layer], state.num_protected
        with torch.no_grad():
            if scores.each is not None:
                assert scores.valid is not None
                if variant == "bsm":
                    plan = bsm_plan_padded(scores.metric, scores.each, scores.valid, p, scores.r, scores.slots)
                else:
                    assert scores.order is not None
                    plan = padded_plan(
                        variant, scores.metric, scores.order, scores.each, scores.valid, scores.r, scores.slots
                    )
            elif variant == "bsm":
                plan = bipartite_soft_matching(scores.metric, scores.r, p)
            else:
                assert scores.order is not None
                plan = VARIANTS[variant](scores.metric, scores.order, scores.r, p)
        if self.size_weighted:
            return plan
        # Plain mean of each group as in the original's text patches; the sizes are still carried
        # (summed) so that pooling, tracing and proportional attention see the true counts.
        return plan.with_equal_weights()
