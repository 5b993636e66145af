"""Entry point: registers the diffusers adapter with tmcore (diffusers itself is imported lazily)."""

import tmcore
from tm_diffusers.adapter import Diffusers


@tmcore.hookimpl
def tmcore_register_adapters(register):
    register(Diffusers)
