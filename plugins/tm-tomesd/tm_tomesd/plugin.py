"""Entry point: registers the ToMe-for-Stable-Diffusion reducer with tmcore."""

import tmcore
from tm_tomesd.reducer import ToMeSD


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(ToMeSD)
