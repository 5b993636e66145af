"""tm-atc: ATC, Agglomerative Token Clustering (Haurum et al., ECCV 2024), as a tmcore reducer.

tmcore.apply(model, "atc")                                   # keep rate 0.9 at blocks 3, 6, 9
tmcore.apply(model, "atc", keep_rate=0.5, linkage="complete", prop_attn=True)
tmcore.apply(model, "atc", r=16, linkage="single")           # off the shelf: 16 tokens fewer per block
"""

from tm_atc.cluster import agglomerate, cluster_plan, cosine_distances, padded_cluster_plan
from tm_atc.reducer import ATC, ATCConfig

__version__ = "0.1.0"
__all__ = ["ATC", "ATCConfig", "agglomerate", "cluster_plan", "cosine_distances", "padded_cluster_plan"]
