"""tm-random: random token pruning, a baseline (Haurum et al., ICCV-W 2023), as a tmcore reducer.

tmcore.apply(model, "random", r=8)            # 8 random tokens dropped in every block
tmcore.apply(model, "random", r=8, seed=1)    # another, equally reproducible, draw
"""

from tm_random.draws import draw_keys, layer_key, splitmix64
from tm_random.reducer import RandomPrune, RandomPruneConfig

__version__ = "0.1.0"
__all__ = [
    "RandomPrune",
    "RandomPruneConfig",
    "draw_keys",
    "layer_key",
    "splitmix64",
]
