"""Counting the points where a GPU host would wait for the device.

A training step on a GPU is fast only if the host can queue its kernels ahead of the device. Reading
a value back (`.item()`, `bool(t)`, `torch.equal`), data-dependent sizes (`nonzero`, `unique`) and
boolean-mask indexing each stop the host until the device catches up. On a CPU these cost nothing,
so `SyncOps` records them there (a dispatch mode over every aten op); on CUDA,
`torch.cuda.set_sync_debug_mode` also sees blocking host-to-device copies.
`OpsSeen` records every op a block dispatches (which kernels ran, and how many).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READS = {"_local_scalar_dense", "equal", "nonzero", "masked_select", "unique", "_unique2", "is_nonzero"}


class SyncOps(TorchDispatchMode):
    """`with SyncOps() as s: ...` records in `s.seen` the name of every op that would sync a GPU."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in READS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


class OpsSeen(TorchDispatchMode):
    """`with OpsSeen() as s: ...` records in `s.names` the name of every aten op dispatched (in order):
    which kernels ran, and how many (a proxy for kernel launches)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
