"""Give freed heap memory back to the operating system between a run's large stages (glibc only).

glibc keeps the pages of freed blocks smaller than its mmap threshold (which rises to 32 MB as large blocks are
freed) for later allocations, so after a transient peak (a backbone batch's activations, a chunk's work space) the
resident size stays up and every later stage is measured, and charged by the OS, on top of it. ``malloc_trim(0)``
returns those free pages; it takes milliseconds. Elsewhere (musl, macOS, Windows) `trim` does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """glibc's malloc_trim, or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim() -> bool:
    """Return the free pages of every malloc arena to the OS; True when glibc did (False: not glibc, a no-op)."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
