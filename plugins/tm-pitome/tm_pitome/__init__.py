"""tm-pitome: PiToMe, spectrum-preserving token merging (Tran et al., NeurIPS 2024), as a tmcore reducer.

    tmcore.apply(model, "pitome", ratio=0.9)                     # keep 90 % of the tokens per block
    tmcore.apply(model, "pitome", ratio=0.9, variant="pitome")   # the paper's procedure everywhere

The method is `tm_pitome.energy` (energy score) and `tm_pitome.merge` (merge procedures as Plans).
"""

from tm_pitome.energy import elu_energy, energy_order, gaussian_energy, similarity
from tm_pitome.merge import energy_scores, merge_count, pitome_bsm_plan, pitome_match, pitome_plan, pitome_text_plan
from tm_pitome.reducer import PiToMe, PiToMeConfig

__version__ = "0.1.0"
__all__ = [
    "PiToMe",
    "PiToMeConfig",
    "elu_energy",
    "energy_order",
    "energy_scores",
    "gaussian_energy",
    "merge_count",
    "pitome_bsm_plan",
    "pitome_match",
    "pitome_plan",
    "pitome_text_plan",
    "similarity",
]
