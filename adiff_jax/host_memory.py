"""Keep freed host memory for the next step (glibc; matters for XLA:CPU runs).

XLA:CPU allocates each execution's temporary buffer (a training step's saved activations:
1.7 GB for the tiny model at 4 x 16 x 64 x 64) with posix_memalign on one of its worker threads
and frees it when the step ends. glibc serves a request that large from a thread arena with a
fresh mmap and unmaps it on free, so every step page-faults and zeroes the whole buffer again:
a third of the tiny training step's CPU time went to the kernel (perf: clear_page, page faults).
One arena, no mmap and no trimming keep the freed pages in the heap, where the next step's
buffer lands on them. Peak memory is unchanged (the buffer is live at the peak anyway); what
changes is that the process keeps it between steps.

Call `keep_freed_memory()` first thing in a training entry point (before JAX starts its threads:
glibc binds a thread to an arena at its first allocation); `train.py` does. A library import
never calls it. Sampling does not use it: a whole video is one execution, so its buffer is
mapped once per video, not once per step, and the single arena's lock costs more than that
(tiny model, 25 steps: 4.6-4.9 s with it, 4.0 s without).
`ADIFF_JAX_GLIBC_MALLOC=default` in the environment leaves glibc as it is.

The flip side: host copies freed while setting up (weights read into numpy, then copied into
device buffers) stay resident too, and the first step's buffer cannot reuse them when it is
larger than the gaps they leave. `release_freed_memory()` (malloc_trim) hands those pages back
once after setup and once after the compile, before the first step (SD1.5-size training step on
CPU: peak RSS 18.1 -> 14.7 GiB, bench/RESULTS.md).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
ENV = "ADIFF_JAX_GLIBC_MALLOC"


def _glibc():
  """glibc's libc through ctypes, or None (not Linux, or another libc: musl has no arenas and
  no malloc_trim)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version
    return libc
  except (OSError, AttributeError):
    return None


def keep_freed_memory() -> bool:
  """Tune glibc malloc as above; returns whether it was applied (False off glibc/Linux or when
  ADIFF_JAX_GLIBC_MALLOC=default)."""
  libc = None if os.environ.get(ENV, "") == "default" else _glibc()
  if libc is None:
    return False
  mallopt = libc.mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # -1 reaches glibc as SIZE_MAX (its threshold is a size_t): never give the heap top back.
  return bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1))


def release_freed_memory() -> bool:
  """Give the pages of freed heap memory back to the OS now (glibc `malloc_trim(0)`, which also
  releases whole free pages inside the heap, not only at its top). Returns whether any were."""
  libc = _glibc()
  if libc is None:
    return False
  trim = libc.malloc_trim
  trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
  return bool(trim(0))
