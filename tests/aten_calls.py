"""Test helper: record the aten calls made under a dispatch mode (works on the meta device too)."""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class AtenCalls(TorchDispatchMode):
    """Every aten call under it: ``ops`` in order by full name (``aten::_foreach_sign``), ``calls`` counted by op."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
