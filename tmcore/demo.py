"""``make demo``: ToMe r=13 on a random-init DeiT-S, token counts and side-by-side speed-up."""

import sys

from tmcore.cli import main

if __name__ == "__main__":
    sys.exit(
        main(["bench", "--model", "timm:deit_small_patch16_224", "--reducer", "tome:r=13", "--batch-size", "32",
              "--rounds", "5", "--show-counts", "--reduction-share"])
    )
