"""tm-ltmp: LTMP, Learned Thresholds token Merging and Pruning (Bonnaerens & Dambre, TMLR 2023),
as a tmcore reducer.

    tmcore.apply(model, "ltmp")                          # thresholds 0.9 / 0 per block, to be learned
    history = tm_ltmp.fit(model, train_loader, reduction_target=0.75)
    tmcore.save(model, "ltmp.safetensors")               # config + thresholds
    model.eval(); logits = model(images)                 # tokens removed, count adapted per image
"""

from tm_ltmp.fit import FitHistory, fit, get_reducer, thresholds
from tm_ltmp.loss import flops_penalty, flops_ratio, loss
from tm_ltmp.reducer import DEFAULT_THRESHOLDS, LTMP, LTMPConfig

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_THRESHOLDS",
    "FitHistory",
    "LTMP",
    "LTMPConfig",
    "fit",
    "flops_penalty",
    "flops_ratio",
    "get_reducer",
    "loss",
    "thresholds",
]
