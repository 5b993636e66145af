"""Entry point: registers the timm adapter with tmcore (timm itself is imported lazily)."""

import tmcore
from tm_timm.adapter import TimmViT


@tmcore.hookimpl
def tmcore_register_adapters(register):
    register(TimmViT)
