"""tm-diffrate: DiffRate, Differentiable Compression Rate (Chen et al., ICCV 2023), as a tmcore
reducer.

    tmcore.apply(model, "diffrate", schedule="deit-s-2.9")     # a published DeiT-S schedule
    tmcore.apply(model, "diffrate", prune=[...], merge=[...])  # kept counts per block, CLS included
    result = tm_diffrate.search(model, train_loader, target_flops=0.35, out="schedule.safetensors")
    tmcore.load(model, "schedule.safetensors")                 # the searched schedule
"""

from tm_diffrate.reducer import DiffRate, DiffRateConfig, read_schedule_file
from tm_diffrate.schedules import KEEP_ALL, PUBLISHED, token_counts
from tm_diffrate.search import SearchHistory, flops, get_reducer, search

__version__ = "0.1.0"
__all__ = [
    "DiffRate",
    "DiffRateConfig",
    "KEEP_ALL",
    "PUBLISHED",
    "SearchHistory",
    "flops",
    "get_reducer",
    "read_schedule_file",
    "search",
    "token_counts",
]
