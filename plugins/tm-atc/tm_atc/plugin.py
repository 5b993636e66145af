"""Entry point: registers the ATC reducer with tmcore."""

import tmcore
from tm_atc.reducer import ATC


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(ATC)
