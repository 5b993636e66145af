"""PiToMe's merge procedures (docs/algorithms.md 3.3) as tmcore Plans.

Every function takes the similarity ``sim [B, T, T]`` and the energy order ``order [B, T]`` of
the ``T`` non-protected tokens and returns a Plan over all ``N = p + T`` tokens: the ``p``
protected prefix tokens stay in front, untouched, and the rest follows in the original's output
order. Indices into the non-protected tokens are shifted by ``p`` when the Plan is built, which is
the original's "strip the class token, merge, re-attach it in front" without the copies.

All three are batched gathers and one sort at most; ``r`` is a Python int from the static token
count, so nothing here synchronises with the device.

Padded batches (``valid`` ``[B, N]``, real tokens first): every sample removes its own
``r_i`` (a ``[B]`` tensor from its own token count), ranks are masked instead of sliced, and the
unpadded output order is rebuilt with `tmcore.plan.pack` at a static size (`padded_bounds`), so
sample ``i`` gets exactly its plan alone, then padding; still no host synchronisation.
``bsm`` (plain ToMe on a ratio, the original's HF-CLIP early layers) is the core's
`bipartite_soft_matching` unpadded and `bsm_plan_padded` padded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tm_pitome.energy import elu_energy, energy_order, gaussian_energy, similarity
from tmcore import Plan
from tmcore.compiling import per_shape
from tmcore.matching import best_partner, bipartite_plan, bipartite_scores, bipartite_soft_matching, rank_key
from tmcore.plan import pack

__all__ = [
    "Variant",
    "VARIANTS",
    "merge_count",
    "merge_counts",
    "removed",
    "removed_each",
    "padded_bounds",
    "pitome_plan",
    "pitome_bsm_plan",
    "pitome_text_plan",
    "energy_scores",
    "pitome_match",
    "padded_plan",
    "bsm_plan_padded",
]

Variant = Literal["pitome", "pitome_bsm", "pitome_text", "bsm"]


def merge_count(num_tokens: int, ratio: float) -> int:
    """Tokens one block removes: ``r = floor(T - T * ratio)`` for ``T`` non-protected tokens.

    Computed exactly as the original does (in floating point), so ``T - r`` is ``ratio * T``
    rounded up, and the per-block counts match its tables (docs/algorithms.md 3.4).
    """
    return math.floor(num_tokens - num_tokens * ratio)


def merge_counts(num_tokens: Tensor, ratio: float) -> Tensor:
    """`merge_count` per sample: ``[B]`` long token counts -> ``[B]`` long ``r``, in float64 like
    Python's floats (the same IEEE products and differences, hence the same floors)."""
    t = num_tokens.to(torch.float64)
    return torch.floor(t - t * ratio).long()


def removed(variant: str, num_tokens: int, ratio: float, num_protected: int) -> int:
    """Tokens one block of ``variant`` removes from ``T = num_tokens`` unprotected tokens.

    ``merge_count(T, ratio)``; for ``bsm`` the original's ratio of *all* tokens, the prefix
    included, capped at ``T // 2`` (bipartite matching cannot remove more; the original has no
    cap and would merge its class token away at ``ratio = 0.5`` with an even token count).
    """
    if ratio >= 1.0:
        return 0
    if variant == "bsm":
        return min(merge_count(num_tokens + num_protected, ratio), num_tokens // 2)
    return merge_count(num_tokens, ratio)


def removed_each(variant: str, num_tokens: Tensor, ratio: float, num_protected: int) -> Tensor:
    """`removed` per sample: ``[B]`` long unprotected real tokens -> ``[B]`` long ``r_i``."""
    if ratio >= 1.0:
        return torch.zeros_like(num_tokens)
    if variant == "bsm":
        return merge_counts(num_tokens + num_protected, ratio).minimum(num_tokens // 2)
    return merge_counts(num_tokens, ratio)


@per_shape(maxsize=1024)
def padded_bounds(variant: str, num_tokens: int, ratio: float, num_protected: int) -> tuple[int, int]:
    """Static sizes of a padded plan over ``N = p + T`` slots: ``(r_max, m_max)``, the most tokens
    and the most output slots any sample with ``T_i <= T`` unprotected real tokens can have.

    Computed over every ``T_i`` in Python (no host sync, cached per shape). The output bound is
    ``N - removed(T)``: a sample keeps ``T_i - r(T_i) = ceil(ratio T_i)`` (up to the float
    rounding of the floor), which never decreases with ``T_i``, so the longest possible sample
    bounds every other and a batch whose longest sample fills all ``N`` slots has no spare slot.
    The maximum over ``T_i`` makes the bound hold whatever the rounding does.
    """
    p = num_protected
    counts = [removed(variant, t, ratio, p) for t in range(num_tokens + 1)]
    return max(counts), p + max(t - r for t, r in enumerate(counts))


def _submatrix(sim: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``sim[b, rows[b, i], cols[b, j]]``: ``[B, T, T]``, ``[B, R]``, ``[B, C]`` -> ``[B, R, C]``.

    Gathered from the layer's one similarity matrix, never recomputed.
    """
    b, t, _ = sim.shape
    offsets = torch.arange(b, device=rows.device).unsqueeze(1) * t
    picked = sim.reshape(b * t, t).index_select(0, (rows + offsets).flatten())  # whole rows: one copy
    return picked.view(b, rows.shape[1], t).gather(2, cols.unsqueeze(1).expand(-1, rows.shape[1], -1))


def _prefix(batch: int, p: int, device: torch.device) -> Tensor:
    return torch.arange(p, device=device).expand(batch, p)


def _check_r(r: int, limit: int, name: str, t: int) -> None:
    if not 0 < r <= limit:
        raise ValueError(f"{name}: r={r} is outside [1, {limit}] for {t} non-protected tokens")


def _paired_plan(sim: Tensor, a: Tensor, b: Tensor, rest: Tensor, p: int) -> Plan:
    """Merge every ``a[:, i]`` into its most similar ``b[:, j]``; keep ``rest`` unmerged.

    Args:
        sim: ``[B, T, T]``.
        a, b: ``[B, r]`` candidate sources and destinations (indices among the ``T`` tokens).
        rest: ``[B, T - 2r]`` tokens kept as they are.
        p: protected prefix length.

    Returns:
        Plan with output ``[prefix, rest, b]``; all ``r`` sources merge (no ranking step).
    """
    batch, t, _ = sim.shape
    dst = best_partner(_submatrix(sim, a, b))[1]  # [B, r], first maximum on ties
    keep = torch.cat([_prefix(batch, p, sim.device), rest + p, b + p], dim=1)
    return Plan(keep=keep, src=a + p, src_dst=dst + (p + rest.shape[1]), num_in=p + t)


def pitome_plan(sim: Tensor, order: Tensor, r: int, num_protected: int = 0) -> Plan:
    """``pitome``, the paper's procedure (docs/algorithms.md 3.3 a).

    The ``2r`` highest-energy tokens are candidates; by energy rank they alternate A, B, A, B...
    Each A token merges into its most similar B token; the other ``T - 2r`` tokens are protected.

    Args:
        sim: ``[B, T, T]`` similarity of the non-protected tokens.
        order: ``[B, T]`` token indices by descending energy.
        r: tokens to remove, ``1 <= r <= T // 2`` (hence the method's ``ratio >= 0.5``).
        num_protected: ``p``, prefix tokens placed first and never merged.

    Returns:
        Plan from ``p + T`` to ``p + T - r`` tokens, output order
        ``[prefix, protected (descending energy), B (in energy order)]``.
    """
    t = sim.shape[1]
    _check_r(r, t // 2, "pitome", t)
    return _paired_plan(sim, order[:, 0 : 2 * r : 2], order[:, 1 : 2 * r : 2], order[:, 2 * r :], num_protected)


def pitome_text_plan(sim: Tensor, order: Tensor, r: int, num_protected: int = 0) -> Plan:
    """``pitome_text``'s procedure: like `pitome_plan`, but the candidates split into energy halves.

    The ``r`` highest-energy tokens are A, the next ``r`` are B (the original's text code says
    this split works better than alternating). Output ``[prefix, protected, B]`` as in `pitome_plan`.

    Args:
        sim: ``[B, T, T]``; order: ``[B, T]`` by descending energy; r: ``1 <= r <= T // 2``;
        num_protected: ``p``.
    """
    t = sim.shape[1]
    _check_r(r, t // 2, "pitome_text", t)
    return _paired_plan(sim, order[:, :r], order[:, r : 2 * r], order[:, 2 * r :], num_protected)


def pitome_bsm_plan(sim: Tensor, order: Tensor, r: int, num_protected: int = 0) -> Plan:
    """``pitome_bsm``: ToMe's bipartite soft matching on energy-ordered tokens (docs/algorithms.md 3.3 b).

    By energy rank tokens alternate A, B, A, B... over all ``T`` tokens; each A token finds its
    most similar B token; the ``r`` A tokens with the best matches merge, the others stay.

    Args:
        sim: ``[B, T, T]``; order: ``[B, T]`` by descending energy;
        r: ``1 <= r <= ceil(T / 2)`` (and ``T >= 2``); num_protected: ``p``.

    Returns:
        Plan with output order ``[prefix, unmerged A (by descending match score), B (energy order)]``.
        As in the original, unmerged A tokens are not re-sorted (no class token among them).
    """
    batch, t, _ = sim.shape
    _check_r(r, (t + 1) // 2 if t >= 2 else 0, "pitome_bsm", t)
    a, b = order[:, 0::2], order[:, 1::2]
    best, best_b = best_partner(_submatrix(sim, a, b))  # [B, ceil(T/2)]
    ranked = torch.sort(rank_key(best), dim=-1, descending=True, stable=True).indices  # ties by energy rank
    src, unm = ranked[:, :r], ranked[:, r:]
    p = num_protected
    keep = torch.cat([_prefix(batch, p, sim.device), a.gather(1, unm) + p, b + p], dim=1)
    src_dst = best_b.gather(1, src) + (p + unm.shape[1])
    return Plan(keep=keep, src=a.gather(1, src) + p, src_dst=src_dst, num_in=p + t)


VARIANTS: dict[str, Callable[[Tensor, Tensor, int, int], Plan]] = {
    "pitome": pitome_plan,
    "pitome_bsm": pitome_bsm_plan,
    "pitome_text": pitome_text_plan,
}
"""Energy-ranked merge procedure by name; ``pitome_text`` also selects the Gaussian energy.
(``bsm`` ranks nothing by energy: `tmcore.matching.bipartite_soft_matching` on the keys.)"""


# -- padded batches ------------------------------------------------------------------------------


def _finish(candidates: Tensor, kept: Tensor, src: Tensor, target: Tensor, r: Tensor, valid: Tensor, m: int) -> Plan:
    """`pack` a padded batch's decisions into ``m`` slots; a sample with ``r_i = 0`` keeps its
    tokens in place, as the unpadded path skips the block for it (no energy re-ordering).

    Args:
        candidates, kept: ``[B, L]`` (``L >= N``) output candidates and which of them are slots.
        src, target: ``[B, K]`` merged tokens and their candidate position (``-1``: none).
        r: ``[B]`` long; valid: ``[B, N]`` bool; m: the static output size.
    """
    b, n = valid.shape
    spare = candidates.shape[1] - n
    still = (r == 0).unsqueeze(1)
    in_place = F.pad(torch.arange(n, device=valid.device), (0, spare)).expand(b, -1)
    candidates = torch.where(still, in_place, candidates)
    kept = torch.where(still, F.pad(valid, (0, spare)), kept)
    return pack(candidates, kept, n, src, target, num_out=m)


def _paired_padded(sim: Tensor, order: Tensor, a: Tensor, b: Tensor, r: Tensor, valid: Tensor, m: int) -> Plan:
    """`_paired_plan` per sample: the first ``r_i`` of the ``R`` candidate pairs merge.

    Args:
        sim: ``[B, T, T]``; order: ``[B, T]`` (padding ranked last).
        a, b: ``[B, R]`` candidate sources and destinations, entries ``j < r_i`` real.
        r: ``[B]`` long ``r_i``; valid: ``[B, p + T]``; m: the static output size.

    Returns:
        Sample ``i``: ``[prefix, its ranks 2 r_i .. T_i - 1, its r_i B tokens]``, then padding.
    """
    batch, t, _ = sim.shape
    p = valid.shape[1] - t
    pairs = torch.arange(a.shape[1], device=sim.device) < r.unsqueeze(1)  # [B, R]
    dst = best_partner(_submatrix(sim, a, b).masked_fill(~pairs.unsqueeze(1), -math.inf))[1]
    ranks = torch.arange(t, device=sim.device)
    rest = (ranks >= 2 * r.unsqueeze(1)) & (ranks < valid[:, p:].sum(1, keepdim=True))
    candidates = torch.cat([_prefix(batch, p, sim.device), order + p, b + p], dim=1)
    kept = torch.cat([valid[:, :p], rest, pairs], dim=1)
    return _finish(candidates, kept, a + p, torch.where(pairs, dst + (p + t), -1), r, valid, m)


def _ranked_padded(
    best: Tensor, best_b: Tensor, a: Tensor, r: Tensor, p: int, width: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ToMe's ranking step per sample: the ``r_i`` A tokens with the best matches merge.

    Args:
        best, best_b: ``[B, Na]`` each A token's best similarity (``-inf`` on padding A tokens,
            so they rank last) and its partner's index among the B tokens.
        a: ``[B, Na]`` the A tokens (indices among the unprotected tokens).
        r: ``[B]`` long ``r_i``; p: prefix length; width: ``R >= r_i``, the static source count.

    Returns:
        ``(ranked [B, Na], merges [B, Na] by rank, src [B, R], target [B, R])``; targets index
        candidates laid out ``[prefix, Na A candidates, B tokens]`` (``-1``: no merge).
    """
    n_a = best.shape[1]
    ranked = torch.sort(rank_key(best), dim=-1, descending=True, stable=True).indices  # ties: A order
    merges = torch.arange(n_a, device=best.device) < r.unsqueeze(1)
    src = ranked[:, :width]
    target = torch.where(merges[:, :width], best_b.gather(1, src) + (p + n_a), -1)
    return ranked, merges, a.gather(1, src) + p, target


def padded_plan(variant: str, sim: Tensor, order: Tensor, r: Tensor, valid: Tensor, width: int, m: int) -> Plan:
    """An energy-ranked procedure (`VARIANTS`) on a padded batch: sample ``i`` removes ``r_i``
    of its ``T_i`` real unprotected tokens exactly as the unpadded procedure does alone.

    Args:
        variant: ``pitome``, ``pitome_bsm`` or ``pitome_text``.
        sim: ``[B, T, T]``; order: ``[B, T]`` from `energy_scores` with the padding mask.
        r: ``[B]`` long ``r_i`` (`removed_each`); valid: ``[B, N]`` bool, ``N = p + T``.
        width, m: ``(r_max, m_max)`` from `padded_bounds`.

    Returns:
        A ragged Plan with ``m`` slots (``Plan.valid``); sample ``i`` holds ``N_i - r_i`` tokens.
    """
    batch, t, _ = sim.shape
    p = valid.shape[1] - t
    if variant == "pitome":
        return _paired_padded(sim, order, order[:, 0 : 2 * width : 2], order[:, 1 : 2 * width : 2], r, valid, m)
    if variant == "pitome_text":  # B: ranks r_i .. 2 r_i - 1 of each sample
        b_rank = (r.unsqueeze(1) + torch.arange(width, device=sim.device)).clamp(max=max(t - 1, 0))
        return _paired_padded(sim, order, order[:, :width], order.gather(1, b_rank), r, valid, m)
    real = valid[:, p:].sum(1, keepdim=True)
    a, b = order[:, 0::2], order[:, 1::2]
    a_rank = torch.arange(0, t, 2, device=sim.device)
    a_real = a_rank < real
    b_real = a_rank[: b.shape[1]] + 1 < real
    scores = _submatrix(sim, a, b).masked_fill(~(a_real.unsqueeze(2) & b_real.unsqueeze(1)), -math.inf)
    best, best_b = best_partner(scores)
    ranked, merges, src, target = _ranked_padded(best, best_b, a, r, p, width)
    a_kept = ~merges & a_real.gather(1, ranked)  # unmerged A tokens by descending match score
    candidates = torch.cat([_prefix(batch, p, sim.device), a.gather(1, ranked) + p, b + p], dim=1)
    kept = torch.cat([valid[:, :p], a_kept, b_real], dim=1)
    return _finish(candidates, kept, src, target, r, valid, m)


def bsm_plan_padded(metric: Tensor, r: Tensor, valid: Tensor, num_protected: int, width: int, m: int) -> Plan:
    """``bsm`` on a padded batch: ToMe's bipartite soft matching by position parity with a
    per-sample ``r_i``, each sample exactly as `bipartite_soft_matching` gives it alone.

    Args:
        metric: ``[B, N, d]`` keys, the prefix included; r: ``[B]`` long ``r_i``;
        valid: ``[B, N]``; num_protected: ``p``; width, m: from `padded_bounds`.

    Returns:
        A ragged Plan: ``[prefix, unmerged A, B]``, unmerged A in positional order when ``p > 0``
        and by descending match score when ``p == 0`` (the core's orders).
    """
    with torch.no_grad():
        best, partner = best_partner(bipartite_scores(metric, num_protected, valid))
        return bipartite_plan(best, partner, width, metric.shape[1], num_protected, valid, each=r, num_out=m)


def energy_scores(
    metric: Tensor, margin: float, variant: Variant = "pitome", alpha: float = 1.0, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One layer's scores: the similarity and the energy order of the unprotected tokens.

    Args:
        metric: ``[B, T, d]`` head-mean keys of the unprotected tokens (prefix stripped).
        margin: the layer's energy margin; variant: ``pitome_text`` selects the Gaussian energy,
            the others the ELU energy with ``alpha``.
        valid: ``[B, T]`` bool padding mask of these tokens: energies average over real tokens
            only and padding is ranked last.

    Returns:
        ``(sim [B, T, T], order [B, T])``, tokens by descending energy.
    """
    with torch.no_grad():
        sim = similarity(metric)
        if variant == "pitome_text":
            energy = gaussian_energy(sim, margin, valid)
        else:
            energy = elu_energy(sim, margin, alpha, valid)
        return sim, energy_order(energy, valid)


def pitome_match(
    metric: Tensor,
    r: int,
    margin: float,
    variant: Variant = "pitome",
    alpha: float = 1.0,
    num_protected: int = 0,
) -> Plan:
    """The whole method for one layer: energy, order, merge procedure.

    Args:
        metric: ``[B, N, d]`` head-mean keys of all tokens, the protected prefix included.
        r: tokens to remove (see the procedure's limits).
        margin: the energy margin of this layer (``< 1`` for ``pitome_text``).
        variant: ``pitome``, ``pitome_bsm`` (ELU energy), ``pitome_text`` (Gaussian energy) or
            ``bsm`` (no energy: ToMe's matching by position, ``r <= (N - p) // 2``).
        alpha: ELU alpha of the vision energy.
        num_protected: ``p``, prefix tokens that never merge.

    Returns:
        Plan from ``N`` to ``N - r`` tokens.
    """
    if variant == "bsm":
        return bipartite_soft_matching(metric, r, num_protected)
    sim, order = energy_scores(metric[:, num_protected:], margin, variant, alpha)
    with torch.no_grad():
        return VARIANTS[variant](sim, order, r, num_protected)
