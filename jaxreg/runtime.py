"""Process-wide settings that change how fast jaxreg runs, not what it computes.

:func:`retain_host_memory` keeps the memory XLA frees on the CPU for its next call,
instead of handing it back to the operating system and faulting it in again. It is opt-in:
it changes the whole process's C allocator, which a library should not do on import.
"""

from __future__ import annotations

import ctypes
import platform
import warnings

__all__ = ["retain_host_memory"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest trim threshold mallopt takes (a C int): free memory at the top of the heap
# is handed back to the system only beyond 2 GiB.
_KEEP_UP_TO = 2**31 - 1


def _backends_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def retain_host_memory() -> bool:
    """Let the C allocator keep freed memory for reuse; call it before JAX's first computation.

    XLA allocates a program's temporaries afresh on every call, and glibc hands large
    freed blocks back to the kernel (blocks above its mmap threshold, at most 32 MiB, are
    unmapped; the heaps of the arenas that threads allocate from are trimmed), so the next
    call faults every page in again, zeroed: the gradient of a 7-squaring
    ``Velocity.exp`` at 128^3 on CPU (1.1 GiB of temporaries) took 275,000 page faults a
    call. This sets glibc's ``mallopt`` so that large blocks come from the heap, one arena
    serves every thread and freed memory stays in the process up to 2 GiB: the same
    gradient then ran 0.95-1.15 s a call with no page faults, against 1.2-2.3 s (2-core
    CPU; torch's scaling and squaring went from 1.96 to 1.79 s under the same setting).
    Programs that run one call at a time on large 3-D arrays in a Python loop gain most (a
    jitted SVF + LNCC optax step at 80x96x112: 663 against 712 ms); ``register`` runs
    each level's steps inside one call and gained nothing measurable (OASIS 3-D, 6.1-6.6
    s either way).

    The costs: the heap grows, in bursts, until freed blocks fit the next call's (a
    program with 64 MiB of temporaries, 100 calls, four runs: page faults on 2 to 8 calls,
    mostly among the first 30, and a resident peak of 371 to 755 MiB against 325 MiB
    without the setting), the process keeps that memory until it ends, and threads share
    one arena for small blocks. mallopt keeps at most 2 GiB: a program with more
    temporaries than that still gives the rest back and faults it in again, and there the
    setting can cost more than it saves (the same gradient at 160x192x224, 3.3 GiB: median
    12.3 s a call against 9.2 s, in two runs of 3 calls each, best 6.6 against 5.9 s;
    ``benchmarks/results/kernels-svf-retained.md``).
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` set before Python starts is an alternative
    without those costs that needs no call: transparent huge pages, 500 times fewer
    faults, 1.0 s a call on the same gradient.

    Must run before JAX's first computation in the process: the arenas that XLA's threads
    make then are not given back by a later call. Returns True where the settings were
    applied; False on other systems and C libraries (nothing changes), or, with a warning,
    once JAX's backends have started.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if _backends_started():
        warnings.warn(
            "retain_host_memory() called after JAX's first computation: the threads' "
            "allocator arenas exist already, so nothing was changed; call it at the start "
            "of the program",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    libc = ctypes.CDLL(None)
    applied = [
        libc.mallopt(_M_MMAP_MAX, 0),
        libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO),
        libc.mallopt(_M_ARENA_MAX, 1),
    ]
    # mallopt returns 1 on success, 0 on a value it refuses.
    return all(result == 1 for result in applied)
