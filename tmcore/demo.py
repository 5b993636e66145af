"""``make demo``: ``tmcore bench`` on the bundled Fashion-MNIST ViT with every installed reducer,
the table on screen and the accuracy / throughput plot in ``bench.png``.

ToMe, ToMeCIS and PiToMe run at settings that span their useful range on this model, PPT at its
defaults with the original's threshold and the two pure regimes, LTMP with the thresholds fitted
to it (``tmcore.models.reducer_files``); any other installed reducer at its ``example_configs``.
"""

from __future__ import annotations

import sys

import tmcore
from tmcore import models
from tmcore.cli import main

MODEL = "fmnist-vit"
SETTINGS = {
    "tome": ["tome:r=8,12,15"],
    "tomecis": ["tomecis:r=8,12,15"],  # beside ToMe at the same r: what class-importance weights change
    "pitome": ["pitome:ratio=0.95,0.9"],
    # the original's threshold, and the two pure regimes: all pooling (= ToMe at blocks 3, 6, 9), all pruning
    "ppt": ["ppt:threshold=7e-5,inf,0"],
}


def _spec(name: str, config: dict) -> str:
    return name + ":" + ";".join(f"{k}={v!r}" for k, v in config.items()) if config else name


def bench_args() -> list[str]:
    """The ``tmcore bench`` arguments of the demo, from what is installed."""
    args = ["bench", "--model", MODEL, "--batch-size", "32", "--rounds", "6", "--show-counts", "--plot", "bench.png"]
    for reg in tmcore.reducers().values():
        learned = models.reducer_files(MODEL, reg.name)
        if reg.name in SETTINGS:
            specs = SETTINGS[reg.name]
        elif learned:
            for path in learned:
                args += ["--load", path]
            continue
        else:
            specs = [_spec(reg.name, dict(c)) for c in reg.obj.example_configs]
        for spec in specs:
            args += ["--reducer", spec]
    return args


if __name__ == "__main__":
    sys.exit(main([*bench_args(), *sys.argv[1:]]))
