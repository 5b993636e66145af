"""The counter-based draws tm-random sorts tokens by; they live in `tmcore.draws` (tm-tomesd draws
its seeded partitions from them too)."""

from tmcore.draws import GAMMA, POSITION_BITS, RANDOM_BITS, draw_keys, layer_key, splitmix64

__all__ = ["GAMMA", "splitmix64", "layer_key", "draw_keys", "RANDOM_BITS", "POSITION_BITS"]
