"""Memory of the process that compresses: glibc's heap returns what the pipeline frees."""

from __future__ import annotations

import numbers

__all__ = ["return_freed_memory"]


def return_freed_memory(threshold: int = 128 * 1024) -> None:
    """Fix glibc's ``M_MMAP_THRESHOLD`` at ``threshold`` bytes for this process (no-op off glibc).

    glibc raises its mmap threshold after each large free (up to 32 MB), so the float64 temporaries of every layer's
    eigh / SVD then stay in the heap after they are freed and the resident set grows block after block; a fixed
    threshold serves them from ``mmap`` and returns them to the OS at once (measured on the defaults:
    ``benchmarks/results/pipeline_memory.md``). Process-wide, so the library never calls it: ``tensornets compress``
    does, and a script running :func:`compress.compress_blocks` on a large (offloaded) model should call it first.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Integral) or threshold < 0:
        raise ValueError(f"threshold={threshold!r} must be a number of bytes, an int >= 0 (default 128 KiB)")
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_MMAP_THRESHOLD = -3
    mallopt(M_MMAP_THRESHOLD, threshold)
