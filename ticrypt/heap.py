"""Process-wide allocator settings for the data path.

:func:`tune_malloc` is called by every role that moves bulk data through
websockets (the frontend's and vmc's legs, the proxy's relay factory).
"""

from __future__ import annotations

import ctypes

#: glibc ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations up to this come from the heap: above the largest record
#: (1 MiB + framing) and the proxy's largest message (2 MiB by default).
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse, not given back.
TRIM_THRESHOLD = 16 * 1024 * 1024
_malloc_tuned = False


def tune_malloc() -> bool:
    """Keep large buffers on the heap (glibc only; once per process;
    returns whether it applied).

    Every record, websocket message and TLS read of the data path is a
    fresh bytes object of up to a few hundred KiB.  glibc serves those from
    ``mmap`` or from the top of the heap and gives them back at ``free``, so
    each one costs page faults and the kernel zeroing its pages (measured:
    a third of ``ticrypt exec``'s CPU time in the kernel).  With these two
    thresholds fixed the memory is reused; at most :data:`TRIM_THRESHOLD`
    of freed memory stays mapped.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                         and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _malloc_tuned
