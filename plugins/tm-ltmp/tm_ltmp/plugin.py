"""Entry point: registers the LTMP reducer with tmcore."""

import tmcore
from tm_ltmp.reducer import LTMP


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(LTMP)
