"""Entry point: registers the DiffRate reducer with tmcore."""

import tmcore
from tm_diffrate.reducer import DiffRate


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(DiffRate)
