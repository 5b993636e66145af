"""Entry point: registers the MCTF reducer with tmcore."""

import tmcore
from tm_mctf.reducer import MCTF


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(MCTF)
