"""Entry point: registers the PPT reducer with tmcore."""

import tmcore
from tm_ppt.reducer import PPT


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(PPT)
