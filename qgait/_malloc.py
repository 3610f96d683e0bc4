"""Keeping freed memory in the process (glibc): the largest single speed-up of CPU training here.

glibc's malloc serves every block above its mmap threshold (dynamic, at most 32 MiB) with a fresh
``mmap`` and returns it to the kernel on ``free``. A training step allocates and frees the same
large activations and gradients every step, so each step page-faults them in again, 4 KiB at a
time: on the 2-core machine of the README, 175-240 k minor faults and 0.33-0.58 s of system time
per GaitLite3D width-1.0 step (0.79-0.92 s). With ``M_MMAP_MAX = 0`` (blocks come from the heap)
and a trim threshold of 2 GiB (freed heap memory is kept) the same step takes 0.56-0.59 s: no
faults after the first steps, for 0.25 GB more resident memory.

Process-wide, so the ``qgait`` command applies it at start-up (``QGAIT_MALLOC=default`` turns it
off) and a library user may call :func:`keep_freed_memory` once at the top of a script.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory (see the module docstring).

    Returns True when applied (now or before); False where it does not apply (not Linux, not
    glibc, e.g. musl or macOS) or when ``QGAIT_MALLOC=default`` is set.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("QGAIT_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _applied = ok
    return ok
