"""Facts about the daemon's own process: when it started, its peak memory, the signals that stop it, and the
allocator tuning that keeps a long-running peer's memory bounded. Owns no state beyond the import time of this module (the fallback start).
"""

from __future__ import annotations

import os
import signal
import sys
import time

_IMPORTED_AT = time.monotonic()

# glibc mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def process_started_at() -> float:
    """This process's start as a `time.monotonic()` value, so start-up times include the interpreter and imports.

    From /proc/self/stat (start time in clock ticks since boot); where there is none, the import of this module.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22; fields after ")" start at 3
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT
    return time.monotonic() - max(age, 0.0)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop this process cleanly: SIGTERM (systemctl stop, docker stop, kill), SIGINT (Ctrl-C) and
    SIGHUP (a closed terminal, a dropped ssh session), which otherwise kills the process with no stop at all. A
    SIGHUP this process inherited as ignored (``nohup``) stays ignored: that is what its operator asked for."""
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGTERM, signal.SIGINT, *hangup)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    VmHWM where the kernel reports it: ru_maxrss survives exec on Linux, so a daemon started by a big parent
    (the demo, a benchmark) would report the parent's peak instead of its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def tune_allocator() -> bool:
    """Keep a long-running peer's memory bounded under glibc: model-sized buffers (updates received, encoded,
    checkpointed) are mmapped and returned to the system when freed, and threads share two malloc arenas.

    glibc's default raises its mmap threshold after the first large free, so every later 4 MB buffer lands in a
    heap that never shrinks, once per thread arena; measured on a 1.1M-parameter swarm this held ~55 MB per peer
    (benchmarks/bench_daemon.py). Skipped when the user set MALLOC_* variables or libc is not glibc.
    """
    if sys.platform != "linux" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 20)) and bool(mallopt(_M_ARENA_MAX, 2))
