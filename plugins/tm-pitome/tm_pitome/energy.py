"""PiToMe's energy score (docs/algorithms.md 3.2): how crowded each token's neighbourhood is.

A token in a large cluster of mutually similar tokens has high energy and becomes a merge
candidate; an isolated, distinctive token has low energy and is kept. All functions are pure,
batched, and take the non-protected tokens only (the caller strips the protected prefix).

Padded batches: ``valid`` ``[B, T]`` (real tokens first) makes every mean run over the sample's
real tokens only, dividing by its own ``T_i``, and puts padding after every real token in the
energy order, so each sample ranks its tokens exactly as it would alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tmcore.matching import rank_key

__all__ = ["similarity", "elu_energy", "gaussian_energy", "energy_order"]


def similarity(metric: Tensor) -> Tensor:
    """Cosine similarity of every token pair.

    Args:
        metric: ``[B, T, d]`` token features (head-mean keys).

    Returns:
        ``[B, T, T]``, self-similarity included. Computed once per layer: the energy reads all of
        it and the matching gathers its sub-matrices, so matched scores are bit-identical to the
        entries the energy saw (and to the original, which gathers the same way).
    """
    m = F.normalize(metric, p=2, dim=-1)  # the original's normalisation (eps-clamped norm)
    return m @ m.transpose(-1, -2)


def _masked_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Mean over the last axis of ``[B, T, T]``, over the real columns only when ``valid``
    ``[B, T]`` is given (divided by the sample's ``T_i``, not by ``T``)."""
    if valid is None:
        return values.mean(dim=-1)
    count = valid.sum(dim=-1, keepdim=True).clamp(min=1).to(values.dtype)  # [B, 1]; 0 only without tokens
    return values.masked_fill_(~valid.unsqueeze(1), 0).sum(dim=-1) / count


def elu_energy(sim: Tensor, margin: float, alpha: float = 1.0, valid: Tensor | None = None) -> Tensor:
    """The vision energy, the original code's variant: ``E_i = mean_j ELU(Sim_ij - margin, alpha)``.

    The mean runs over all ``T`` tokens, the token itself included as in the original; the
    diagonal term is (up to rounding) the same for every token, so it does not change the ranking.

    Args:
        sim: ``[B, T, T]`` from `similarity`.
        margin: similarities above it count linearly, those below saturate towards ``-alpha``.
        alpha: the ELU's negative saturation value.
        valid: ``[B, T]`` bool padding mask (real tokens first): the mean runs over real tokens.

    Returns:
        ``[B, T]`` (padding rows of a padded batch are meaningless; `energy_order` puts them last).
    """
    # ELU(z) = max(z, 0) + alpha * (exp(min(z, 0)) - 1), split in two means: F.elu computes
    # expm1, which is unvectorised on CPU (4x slower than this whole function at T = 196).
    shifted = sim - margin
    positive = _masked_mean(shifted.clamp(min=0), valid)
    saturated = _masked_mean(shifted.clamp_(max=0).exp_(), valid)
    return positive + alpha * (saturated - 1)


def gaussian_energy(sim: Tensor, margin: float, valid: Tensor | None = None) -> Tensor:
    """The text energy (the original's ``pitome_text``): a Gaussian kernel on cosine distance,
    ``E_i = mean_j exp(-((1 - Sim_ij) / sigma)^2 / 2) / (sigma * sqrt(2 pi))``, ``sigma = 1 - margin``.

    Args:
        sim: ``[B, T, T]`` from `similarity`.
        margin: ``< 1``; the kernel's width is ``1 - margin``.
        valid: ``[B, T]`` bool padding mask (real tokens first): the mean runs over real tokens.

    Returns:
        ``[B, T]``.
    """
    sigma = 1.0 - margin
    z = (1.0 - sim).div_(sigma)
    kernel = z.square_().mul_(-0.5).exp_()
    return _masked_mean(kernel, valid) / (sigma * math.sqrt(2.0 * math.pi))


def energy_order(energy: Tensor, valid: Tensor | None = None) -> Tensor:
    """Token indices by descending energy, ``[B, T]`` long.

    Stable, on `tmcore.matching.rank_key`: equal energies keep their current token order, so
    results are deterministic, the same on every device and in any batch (the original's unstable
    ``argsort`` leaves ties unspecified). With a
    padding mask ``valid`` ``[B, T]``, padding comes after every real token (energy ``-inf``;
    real energies are finite), so sample ``i``'s first ``T_i`` ranks are its order alone.
    """
    if valid is not None:
        energy = energy.masked_fill(~valid, -math.inf)
    return torch.sort(rank_key(energy), dim=-1, descending=True, stable=True).indices
