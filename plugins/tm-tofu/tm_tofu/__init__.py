"""tm-tofu: ToFu, Token Fusion (Kim et al., WACV 2024), as a tmcore reducer.

tmcore.apply(model, "tofu", r=13)                   # prune in the first half, MLERP-merge after
tmcore.apply(model, "tofu", r=13, switch=3)         # merge from block 4 on
"""

from tm_tofu.reducer import ToFu, ToFuConfig, prune_sources, reimplementation_merge

__version__ = "0.1.0"
__all__ = ["ToFu", "ToFuConfig", "prune_sources", "reimplementation_merge"]
