"""Entry point: registers the ToFu reducer with tmcore."""

import tmcore
from tm_tofu.reducer import ToFu


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(ToFu)
