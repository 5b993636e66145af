"""Entry point: registers the ToMeCIS reducer with tmcore."""

import tmcore
from tm_tomecis.reducer import ToMeCIS


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(ToMeCIS)
