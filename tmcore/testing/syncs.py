"""Counting host synchronisations on any device, the CPU included.

A host sync is an operation whose result the host must wait for: reading a value back
(``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``) or an operation whose output shape depends
on the values (``nonzero``, boolean indexing, ``masked_select``, ``unique``, ``repeat_interleave``
without ``output_size``). On a GPU each one stalls the pipeline and makes CUDA-graph capture
impossible; on the CPU they cost nothing, which is why they go unnoticed. `count_host_syncs`
counts them wherever the code runs, so a CPU test can hold a reducer to the GPU's rule::

    with count_host_syncs() as syncs:
        model(**inputs)
    assert syncs.total == 0, syncs.ops
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncs", "count_host_syncs", "SYNC_OPS"]

_aten = torch.ops.aten

SYNC_OPS = frozenset(
    {
        _aten._local_scalar_dense.default,  # .item(), bool(t), int(t), float(t)
        _aten.nonzero.default,
        _aten.masked_select.default,
        _aten.equal.default,
        _aten._unique2.default,
        _aten.unique_dim.default,
        _aten.unique_consecutive.default,
        _aten.repeat_interleave.Tensor,
    }
)
"""The aten ops that wait for the device's values (or produce a value-dependent shape)."""

_READ_BACK = frozenset({torch.Tensor.tolist, torch.Tensor.numpy})
"""Tensor methods that read every value to the host without going through an aten op."""


class HostSyncs:
    """What `count_host_syncs` saw: ``ops`` counts each kind by name; ``total`` is their sum."""

    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __repr__(self) -> str:
        return f"HostSyncs({dict(self.ops) or 'none'})"


class _Functions(TorchFunctionMode):
    def __init__(self, seen: HostSyncs) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _READ_BACK and any(isinstance(a, torch.Tensor) and a.device.type != "meta" for a in args):
            self.seen.ops[f"Tensor.{func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


class _Dispatch(TorchDispatchMode):
    def __init__(self, seen: HostSyncs) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in SYNC_OPS and not (func is _aten.repeat_interleave.Tensor and kwargs.get("output_size")):
            self.seen.ops[str(func.overloadpacket.__name__)] += 1
        elif func is _aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            self.seen.ops["index (boolean mask)"] += 1
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count the host synchronisations of the code inside the ``with`` block (see the module)."""
    seen = HostSyncs()
    with _Functions(seen), _Dispatch(seen):
        yield seen
