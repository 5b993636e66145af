"""tm-tome: ToMe, Token Merging (Bolya et al., ICLR 2023), as a tmcore reducer.

tmcore.apply(model, "tome", r=13)            # 13 tokens merged in every block
tmcore.apply(model, "tome", r=(16, -1))      # the paper's decreasing schedule
"""

from tm_tome.reducer import ToMe, ToMeConfig

__version__ = "0.1.0"
__all__ = ["ToMe", "ToMeConfig"]
