"""tm-ppt: PPT, token pruning and pooling (Wu et al., 2023), as a tmcore reducer.

tmcore.apply(model, "ppt")                         # r=50 at blocks 3, 6, 9; threshold 7e-5
tmcore.apply(model, "ppt", r=40, layers=[2, 5, 8])
"""

from tm_ppt.reducer import PPT, PPTConfig, significance

__version__ = "0.1.0"
__all__ = ["PPT", "PPTConfig", "significance"]
