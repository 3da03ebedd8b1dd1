"""Host memory: let glibc keep the memory XLA:CPU frees, so the next step reuses it.

XLA:CPU allocates a step's large buffers (activations, weight gradients) afresh and frees
them after. glibc hands blocks over 32 MiB, and any block over 64 MiB that a worker thread
asks its own arena for, straight to mmap and unmaps them on free, so every step the kernel
maps and zeroes those pages again, one 4 KiB fault at a time: on the 2-core CPU of
docs/benchmarks.md that cost the tiny config a fifth of its step time. One arena, no mmap
and no trimming keep freed blocks in the heap and reuse them.

The price is memory: the heap never shrinks, and fragmentation grows it past the peak that
glibc's defaults reach (the tiny run: 2.6 GB resident instead of 1.4 GB). Your own malloc
settings win: with any MALLOC_* variable or GLIBC_TUNABLES set, nothing is changed.
"""

import ctypes
import ctypes.util
import importlib.util
import os
import pkgutil
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
kept = False  # whether keep_freed_memory changed malloc in this process


def _runs_on_cpu() -> bool:
    """Whether jax will pick the CPU backend, decided without starting it."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0] == "cpu"
    plugins = []
    if importlib.util.find_spec("jax_plugins") is not None:
        import jax_plugins
        plugins = list(pkgutil.iter_modules(jax_plugins.__path__))
    return not plugins and importlib.util.find_spec("libtpu") is None


def keep_freed_memory() -> bool:
    """On Linux glibc with the CPU backend, make malloc reuse freed memory; True if it did.

    Call it before jax starts its backend: threads pick their malloc arena when they start.
    """
    if not sys.platform.startswith("linux") or not _runs_on_cpu():
        return False
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    # -1 as the trim threshold turns trimming off (mallopt(3)).
    global kept
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    kept = all(mallopt(option, value) == 1 for option, value in settings)
    return kept
