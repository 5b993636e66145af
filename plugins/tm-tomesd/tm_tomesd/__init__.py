"""tm-tomesd: ToMe for Stable Diffusion (Bolya and Hoffman, CVPR-W 2023) as a tmcore reducer.

tmcore.apply(pipe.unet, "tomesd", ratio=0.5)            # tomesd.apply_patch(pipe, ratio=0.5)
tmcore.apply(pipe.unet, "tomesd", ratio=0.5, seed=0)    # seeded partitions, compiles with fullgraph=True
"""

from tm_tomesd.merge import random2d_plan, stride_partition
from tm_tomesd.reducer import ToMeSD, ToMeSDConfig

__version__ = "0.1.0"
__all__ = ["ToMeSD", "ToMeSDConfig", "random2d_plan", "stride_partition"]
