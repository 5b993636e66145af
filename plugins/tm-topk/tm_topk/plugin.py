"""Entry point: registers the top-k (EViT) reducer with tmcore."""

import tmcore
from tm_topk.reducer import TopK


@tmcore.hookimpl
def tmcore_register_reducers(register):
    register(TopK)
