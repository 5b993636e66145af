"""tm-topk: EViT's top-k class-attention pruning (Liang et al., ICLR 2022), as a tmcore reducer.

tmcore.apply(model, "topk")                            # keep 70 % at blocks 3, 6, 9 (DeiT-S), fuse the rest
tmcore.apply(model, "topk", keep_rate=0.5, fuse_token=False)
"""

from tm_topk.reducer import TopK, TopKConfig, default_layers, evit_plan, fuse_weighted_sum, keep_count

__version__ = "0.1.0"
__all__ = ["TopK", "TopKConfig", "default_layers", "evit_plan", "fuse_weighted_sum", "keep_count"]
