"""Live tensor-memory accounting through the dispatcher: works on the meta device (nothing is allocated, but every
op's outputs have sizes) and on CPU/CUDA tensors alike.

`LiveBytes` is a TorchDispatchMode that adds each new storage an op returns and drops it once the storage is
freed (a weak storage reference expires), so `peak` is the largest total of live op outputs, deduplicated by
storage (views and in-place ops add nothing). Tensors created before the mode started are not counted unless
`track(...)` is called on them. Kernel-internal workspaces are invisible to it (the CPU calibration measures
those with the allocator, `plan/measure.py`).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Track live bytes of op outputs. `peak` / `current` in bytes; `mark()` starts a new peak window.

    Args:
        ignore: tensors whose storages are never counted (e.g. parameters, counted as weights elsewhere).
        by_op: keep, for the peak moment, the bytes per creating op (for diagnosis).
        device: count only tensors on this device type (a meta probe ignores its small CPU index tensors).
    """

    def __init__(self, ignore: list[torch.Tensor] | None = None, by_op: bool = False, device: str | None = None):
        super().__init__()
        self.device = device
        self._ignore = {_key(t) for t in ignore or []}
        self._live: dict[int, tuple[StorageWeakRef, int, str]] = {}
        self.current = 0
        self.peak = 0
        self.by_op = by_op
        self.peak_ops: Counter = Counter()

    def track(self, *tensors: torch.Tensor, name: str = "input") -> None:
        """Count already existing tensors (inputs made before the mode started) as live."""
        for t in tensors:
            self._add(t, name)
        self._update_peak()

    def mark(self) -> None:
        """Reset the peak to the current live total (a new measurement window)."""
        self._sweep()
        self.peak = self.current

    def _add(self, t: torch.Tensor, name: str) -> None:
        if not isinstance(t, torch.Tensor) or t.is_sparse or (self.device and t.device.type != self.device):
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live or key in self._ignore:
            return
        n = st.nbytes()
        self._live[key] = (StorageWeakRef(st), n, name)
        self.current += n

    def _sweep(self) -> None:
        dead = [k for k, (ref, _, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]

    def _update_peak(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
            if self.by_op:
                self.peak_ops = Counter()
                for _, n, name in self._live.values():
                    self.peak_ops[name] += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()
        out = func(*args, **(kwargs or {}))
        self._sweep()  # a storage freed inside `func` may hand its address to an output
        name = func.__name__ if self.by_op else ""
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t, name)
        self._update_peak()
        return out


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata
