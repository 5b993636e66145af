"""Every installed reducer on every tiny model of every installed adapter (the conformance suite,
generated from the registry, so a newly installed plugin joins the matrix without edits)."""

import tmcore
from tmcore.testing import ReducerConformance

for _reg in tmcore.reducers().values():
    globals()[f"TestMatrix_{_reg.name}"] = type(
        f"TestMatrix_{_reg.name}", (ReducerConformance,), {"reducer": _reg.name}
    )
