"""Entry point: registers the transformers adapter with tmcore (transformers itself is imported lazily)."""

import tmcore
from tm_transformers.adapter import TransformersEncoders


@tmcore.hookimpl
def tmcore_register_adapters(register):
    register(TransformersEncoders)
