"""Entry point: registers the PiToMe reducer with tmcore."""

import tmcore
from tm_pitome.reducer import PiToMe


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(PiToMe)
