"""PiToMe's energy score (ALGORITHMS.md 3.2): how crowded each token's neighbourhood is.

A token in a large cluster of mutually similar tokens has high energy and becomes a merge
candidate; an isolated, distinctive token has low energy and is kept. All functions are pure,
batched, and take the non-protected tokens only (the caller strips the protected prefix).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

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


def elu_energy(sim: Tensor, margin: float, alpha: float = 1.0) -> Tensor:
    """The vision energy, the original code's variant: ``E_i = mean_j ELU(Sim_ij - margin, alpha)``.

    The mean runs over all ``T`` tokens, the token itself included as in the original; the
    diagonal term is (up to rounding) the same for every token, so it does not change the ranking.

    Args:
        sim: ``[B, T, T]`` from `similarity`.
        margin: similarities above it count linearly, those below saturate towards ``-alpha``.
        alpha: the ELU's negative saturation value.

    Returns:
        ``[B, T]``.
    """
    # ELU(z) = max(z, 0) + alpha * (exp(min(z, 0)) - 1), split in two means: F.elu computes
    # expm1, which is unvectorised on CPU (4x slower than this whole function at T = 196).
    shifted = sim - margin
    positive = shifted.clamp(min=0).mean(dim=-1)
    saturated = shifted.clamp_(max=0).exp_().mean(dim=-1)
    return positive + alpha * (saturated - 1)


def gaussian_energy(sim: Tensor, margin: float) -> Tensor:
    """The text energy (the original's ``pitome_text``): a Gaussian kernel on cosine distance,
    ``E_i = mean_j exp(-((1 - Sim_ij) / sigma)^2 / 2) / (sigma * sqrt(2 pi))``, ``sigma = 1 - margin``.

    Args:
        sim: ``[B, T, T]`` from `similarity`.
        margin: ``< 1``; the kernel's width is ``1 - margin``.

    Returns:
        ``[B, T]``.
    """
    sigma = 1.0 - margin
    z = (1.0 - sim).div_(sigma)
    kernel = z.square_().mul_(-0.5).exp_()
    return kernel.mean(dim=-1) / (sigma * math.sqrt(2.0 * math.pi))


def energy_order(energy: Tensor) -> Tensor:
    """Token indices by descending energy, ``[B, T]`` long.

    Stable: equal energies keep their current token order, so results are deterministic and the
    same on every device (the original's unstable ``argsort`` leaves ties unspecified).
    """
    return torch.sort(energy, dim=-1, descending=True, stable=True).indices
