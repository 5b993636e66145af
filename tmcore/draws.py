"""Counter-based random draws: every token's draw is a pure function of ``(seed, block, sample
number, token position)``, computed with integer tensor ops on the tokens' device.

No generator state is read or advanced (``torch.manual_seed`` and friends are untouched), nothing
is synchronised with the host, and the same four numbers give the same draw on every device, in
every batch, in every thread: a sample run alone inside ``runtime.numbered_from(i)`` draws what it
drew as sample ``i`` of its batch.

The mix is splitmix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
OOPSLA 2014; the finaliser of Java's ``SplittableRandom``): the ``i``-th output of a generator
started at ``state`` is ``mix(state + (i + 1) * GAMMA)`` with

    mix(z):  z ^= z >>> 30;  z *= 0xBF58476D1CE4E5B9;  z ^= z >>> 27;  z *= 0x94D049BB133111EB;  z ^= z >>> 31

on 64-bit words. Draws chain it three times::

    layer_key  = output(seed, layer)                  # a Python int, once per block at apply time
    sample_key = output(layer_key, sample number)     # [B]
    draw       = output(sample_key, position) >>> 26  # [B, N], 38 uniform random bits

and a token's sort key is ``draw << 24 | (2**24 - 1 - position)``: the random bits decide, and the
position (the earlier one ranks higher) makes every key of a sample distinct, so any selection
(``topk``, a sort, on any device, padded or not) picks the same tokens. The keys are uniform on
``[0, 2**62)`` up to that tie-break, which matters only where 38 random bits tie (about
``N**2 / 2**39`` per sample: 7e-8 for 197 tokens).

torch has no uint64 arithmetic, so words live in int64 with the same bits: ``+`` and ``*`` wrap
modulo ``2**64`` exactly as unsigned arithmetic does, ``^`` is bitwise, but ``>>`` on int64 is an
arithmetic shift (it copies the sign bit), so the logical shift ``>>>`` masks the copied bits off
(`_shr`). `plugins/tm-random/tests/test_random.py` checks the tensor version bit for bit against plain Python
integers.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GAMMA", "splitmix64", "layer_key", "draw_keys", "RANDOM_BITS", "POSITION_BITS"]

_MASK64 = (1 << 64) - 1
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
GAMMA = 0x9E3779B97F4A7C15
"""splitmix64's increment, the odd integer nearest ``2**64`` / golden ratio."""

RANDOM_BITS = 38
"""Random high bits of a sort key (the top bits of a splitmix64 output)."""
POSITION_BITS = 24
"""Low bits of a sort key: the position's complement, so keys are distinct (up to ``2**24`` tokens)."""


def _signed(word: int) -> int:
    """A 64-bit word (``0 <= word < 2**64``) as the int64 with the same bits."""
    word &= _MASK64
    return word - (1 << 64) if word >> 63 else word


def _shr(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 words: ``>>`` copies the sign bit, the mask clears the copies."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(z: Tensor) -> Tensor:
    """splitmix64's mix of every 64-bit word of ``z`` (int64 tensor, any shape; bits as uint64)."""
    z = (z ^ _shr(z, 30)) * _signed(_M1)
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    return z ^ _shr(z, 31)


def _mix_int(z: int) -> int:
    """`splitmix64` on one Python int (``0 <= z < 2**64``), the unsigned word it returns."""
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def layer_key(seed: int, layer: int) -> int:
    """The key of block ``layer`` under ``seed``: splitmix64's ``layer``-th output from ``seed``,
    as an int64 value (computed once per block when the reducer is built)."""
    return _signed(_mix_int((seed + (layer + 1) * GAMMA) & _MASK64))


def draw_keys(key: int, samples: Tensor, num_tokens: int) -> Tensor:
    """One random sort key per token of every sample.

    Args:
        key: the block's `layer_key`.
        samples: ``[B]`` long, each sample's number (``state.sample_index(x)``).
        num_tokens: ``N <= 2**24``, tokens per sample; draws are by position ``0 .. N - 1``.

    Returns:
        ``[B, N]`` int64 on ``samples``' device in ``[0, 2**62)``, a pure function of
        ``(key, sample number, position)``: 38 uniform random bits, then the position's complement
        (distinct keys within a sample; among equal random bits the earlier position is higher).
    """
    if num_tokens > 1 << POSITION_BITS:
        raise ValueError(f"random draws cover at most {1 << POSITION_BITS} tokens per sample, got {num_tokens}")
    gamma = _signed(GAMMA)
    sample_key = splitmix64(samples.long() * gamma + _signed(key + GAMMA))  # [B]
    positions = torch.arange(num_tokens, device=samples.device)
    words = splitmix64(positions * gamma + (sample_key + gamma).unsqueeze(1))  # [B, N]
    # (words >>> 26) << 24 in two ops: the mask keeps the 38 random bits (and drops the copied sign)
    high = (words >> (64 - RANDOM_BITS - POSITION_BITS)) & (((1 << RANDOM_BITS) - 1) << POSITION_BITS)
    return high | ((1 << POSITION_BITS) - 1 - positions)
