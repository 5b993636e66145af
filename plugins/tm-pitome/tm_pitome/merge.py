"""PiToMe's merge procedures (ALGORITHMS.md 3.3) as tmcore Plans.

Every function takes the similarity ``sim [B, T, T]`` and the energy order ``order [B, T]`` of
the ``T`` non-protected tokens and returns a Plan over all ``N = p + T`` tokens: the ``p``
protected prefix tokens stay in front, untouched, and the rest follows in the original's output
order. Indices into the non-protected tokens are shifted by ``p`` when the Plan is built, which is
the original's "strip the class token, merge, re-attach it in front" without the copies.

All three are batched gathers and one sort at most; ``r`` is a Python int from the static token
count, so nothing here synchronises with the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from tm_pitome.energy import elu_energy, energy_order, gaussian_energy, similarity
from tmcore import Plan

__all__ = [
    "Variant",
    "VARIANTS",
    "merge_count",
    "pitome_plan",
    "pitome_bsm_plan",
    "pitome_text_plan",
    "energy_scores",
    "pitome_match",
]

Variant = Literal["pitome", "pitome_bsm", "pitome_text"]


def merge_count(num_tokens: int, ratio: float) -> int:
    """Tokens one block removes: ``r = floor(T - T * ratio)`` for ``T`` non-protected tokens.

    Computed exactly as the original does (in floating point), so ``T - r`` is ``ratio * T``
    rounded up, and the per-block counts match its tables (ALGORITHMS.md 3.4).
    """
    return math.floor(num_tokens - num_tokens * ratio)


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
    dst = _submatrix(sim, a, b).max(dim=-1).indices  # [B, r], first maximum on ties
    keep = torch.cat([_prefix(batch, p, sim.device), rest + p, b + p], dim=1)
    return Plan(keep=keep, src=a + p, src_dst=dst + (p + rest.shape[1]), num_in=p + t)


def pitome_plan(sim: Tensor, order: Tensor, r: int, num_protected: int = 0) -> Plan:
    """``pitome``, the paper's procedure (ALGORITHMS.md 3.3 a).

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
    """``pitome_bsm``: ToMe's bipartite soft matching on energy-ordered tokens (ALGORITHMS.md 3.3 b).

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
    best, best_b = _submatrix(sim, a, b).max(dim=-1)  # [B, ceil(T/2)]
    ranked = torch.sort(best, dim=-1, descending=True, stable=True).indices  # stable: ties by energy rank
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
"""Merge procedure by name; ``pitome_text`` also selects the Gaussian energy."""


def energy_scores(
    metric: Tensor, margin: float, variant: Variant = "pitome", alpha: float = 1.0
) -> tuple[Tensor, Tensor]:
    """One layer's scores: the similarity and the energy order of the unprotected tokens.

    Args:
        metric: ``[B, T, d]`` head-mean keys of the unprotected tokens (prefix stripped).
        margin: the layer's energy margin; variant: ``pitome_text`` selects the Gaussian energy,
            the others the ELU energy with ``alpha``.

    Returns:
        ``(sim [B, T, T], order [B, T])``, tokens by descending energy.
    """
    with torch.no_grad():
        sim = similarity(metric)
        if variant == "pitome_text":
            energy = gaussian_energy(sim, margin)
        else:
            energy = elu_energy(sim, margin, alpha)
        return sim, energy_order(energy)


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
        variant: ``pitome``, ``pitome_bsm`` (ELU energy) or ``pitome_text`` (Gaussian energy).
        alpha: ELU alpha of the vision energy.
        num_protected: ``p``, prefix tokens that never merge.

    Returns:
        Plan from ``N`` to ``N - r`` tokens.
    """
    sim, order = energy_scores(metric[:, num_protected:], margin, variant, alpha)
    with torch.no_grad():
        return VARIANTS[variant](sim, order, r, num_protected)
