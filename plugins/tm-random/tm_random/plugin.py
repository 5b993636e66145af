"""Entry point: registers the random-pruning reducer with tmcore."""

import tmcore
from tm_random.reducer import RandomPrune


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(RandomPrune)
