"""The persistent XLA compilation cache: a second run with the same shapes compiles nothing.

`enable(directory)` points JAX's persistent cache there and caches every program (JAX's default
skips programs that compile in under a second, i.e. most of the tiny model's); `CacheStats`
counts hits and misses through `jax.monitoring`, so a run can say what it compiled.
"""
from __future__ import annotations

import os

import jax

_REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
_HITS = "/jax/compilation_cache/cache_hits"


def default_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "adiff_jax", "xla")


def enable(directory: str) -> str:
  """Turn the persistent cache on in `directory` (created); returns its absolute path."""
  directory = os.path.abspath(os.path.expanduser(directory))
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


_counts = {"requests": 0, "hits": 0}
_listening = False


def _on_event(event: str, **_):
  if event == _REQUESTS:
    _counts["requests"] += 1
  elif event == _HITS:
    _counts["hits"] += 1


class CacheStats:
  """Compilations through the persistent cache since this object was made, and the hits among
  them (one process-wide `jax.monitoring` listener, registered once)."""

  def __init__(self):
    global _listening
    if not _listening:
      jax.monitoring.register_event_listener(_on_event)
      _listening = True
    self._start = dict(_counts)

  @property
  def hits(self) -> int:
    return _counts["hits"] - self._start["hits"]

  @property
  def misses(self) -> int:
    return _counts["requests"] - self._start["requests"] - self.hits

  def __str__(self) -> str:
    return f"{self.hits} cache hits, {self.misses} compiled"
