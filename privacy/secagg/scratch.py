"""Working buffers a thread reuses from call to call.

A fresh buffer of a few hundred KiB or more comes from the kernel as untouched pages,
and each 4 KiB page faults on first touch, every time. A client masks an update every
round, so its buffers are kept per thread: whatever they hold lives only within one
call, and what leaves the client is copied out of them.
"""

from __future__ import annotations

import threading

import numpy as np

# Above this many values a buffer is not kept (a very large model would hold that much
# memory between rounds); it is allocated afresh instead.
MAX_KEPT_VALUES = 1 << 26
_kept = threading.local()


def scratch(name: str, size: int, dtype) -> np.ndarray:
    """A 1-D buffer of ``size`` values of ``dtype``, this thread's ``name`` buffer if it
    is large enough (its contents are whatever the last call left)."""
    dtype = np.dtype(dtype)
    if size > MAX_KEPT_VALUES:
        return np.empty(size, dtype=dtype)
    buffers = _kept.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.dtype != dtype or buffer.size < size:
        buffer = buffers[name] = np.empty(size, dtype=dtype)
    return buffer[:size]
