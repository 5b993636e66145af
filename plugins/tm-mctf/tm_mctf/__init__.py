"""tm-mctf: MCTF, multi-criteria token fusion with one-step-ahead attention (CVPR 2024), as a
tmcore reducer.

tmcore.apply(model, "mctf")                              # r=16 in every block but the first
tmcore.apply(model, "mctf", r=0.35, layers=[3, 6, 9])    # MCTF-Fast's layout
"""

from tm_mctf.fusion import attraction, bidirectional_plan, merge_count, merged_attention, received_attention
from tm_mctf.reducer import MCTF, MCTFConfig

__version__ = "0.1.0"
__all__ = [
    "MCTF",
    "MCTFConfig",
    "attraction",
    "bidirectional_plan",
    "merge_count",
    "merged_attention",
    "received_attention",
]
