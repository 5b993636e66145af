"""Entry point: registers the ToMe reducer with tmcore."""

import tmcore
from tm_tome.reducer import ToMe


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(ToMe)
