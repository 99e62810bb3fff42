"""host_memory.keep_freed_memory: a large buffer freed and allocated again lands on pages the
process already has (no fresh page faults), as XLA:CPU's per-step temp buffer must."""
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, resource
    from adiff_jax import host_memory
    applied = host_memory.keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    n = 256 << 20                                  # far above glibc's largest mmap threshold (32 MiB)
    for _ in range(2):                             # plain malloc/free as XLA's (numpy asks for huge pages)
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      p = libc.malloc(n)
      ctypes.memset(p, 1, n)                       # touches every page
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
      libc.free(p)
    print(applied, faults)                         # faults of the second allocation
""")


def _probe(env_extra=None):
  import os
  env = dict(os.environ, **(env_extra or {}))
  out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
  applied, faults = out.stdout.split()
  return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_buffer_is_reused_without_page_faults():
  applied, faults = _probe()
  assert applied
  assert faults < 1000, faults                    # 65536 pages of 4 KiB if it were mapped afresh


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_opt_out_leaves_glibc_alone():
  applied, faults = _probe({"ADIFF_JAX_GLIBC_MALLOC": "default"})
  assert not applied
  assert faults > 30000, faults                   # glibc maps and faults the buffer afresh each time


RELEASE_PROBE = textwrap.dedent("""
    import ctypes
    from adiff_jax import host_memory
    host_memory.keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    def rss_mib():
      return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) >> 10
    n = 64 << 20
    ps = [libc.malloc(n) for _ in range(4)]         # "weights read into host memory"
    for p in ps:
      ctypes.memset(p, 1, n)
    keep = libc.malloc(1 << 20)                     # a live block above them: the heap top cannot shrink
    ctypes.memset(keep, 1, 1 << 20)
    for p in ps:                                    # "copied to the device, host copies dropped"
      libc.free(p)
    kept = rss_mib()
    released = host_memory.release_freed_memory()
    print(kept, rss_mib(), released)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_release_gives_freed_setup_memory_back():
  out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, check=True)
  kept, after, released = out.stdout.split()
  assert released == "True"
  assert int(kept) - int(after) > 200, (kept, after)   # the 256 MiB freed (kept by keep_freed_memory)
