"""Giving the memory of a burst back to the operating system once a worker goes idle.

A worker that ran thousands of executions at once frees their objects when they end or
suspend, but the C allocator keeps the freed pages mapped: the resident size of a long-lived
worker stays at its peak. Where the C library is glibc, ``malloc_trim(0)`` returns what is
free at the top of each heap and in whole free pages inside it; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def release_free_memory() -> bool:
    """Collect cyclic garbage (an unwound handler leaves frames and tracebacks in cycles),
    then return freed heap pages to the OS; whether the C library can (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    gc.collect()
    trim(0)
    return True
