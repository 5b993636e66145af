"""Every installed reducer on every tiny model of every installed adapter: the conformance suite,
generated from the registry, so a newly installed plugin (reducer or adapter) joins the matrix
without edits. The project's own reducers already run the suite on the project's own adapters'
models in ``plugins/tm-*/tests/test_conformance.py``; here they run on the other adapters'."""

import tmcore
from tmcore.registry import KNOWN_ADAPTERS, KNOWN_REDUCERS
from tmcore.testing import ReducerConformance

_OWN_ADAPTERS = frozenset(
    name for name, reg in tmcore.adapters().items() if KNOWN_ADAPTERS.get(name) == reg.distribution
)

for _reg in tmcore.reducers().values():
    own = KNOWN_REDUCERS.get(_reg.name) == _reg.distribution
    globals()[f"TestMatrix_{_reg.name}"] = type(
        f"TestMatrix_{_reg.name}",
        (ReducerConformance,),
        {"reducer": _reg.name, "skip_adapters": _OWN_ADAPTERS if own else frozenset()},
    )
