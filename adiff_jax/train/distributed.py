"""Multi-host setup: `jax.distributed.initialize` before any other JAX call.

On Cloud TPU the cluster is detected automatically (no arguments needed); elsewhere (GPU
clusters, CPU tests) the coordinator address, process count and id are given explicitly.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import jax
import numpy as np
from adiff_jax.errors import InputError


def on_tpu_vm() -> bool:
  """Cheap detection that does not initialise a JAX backend (that must come after initialize)."""
  if any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "TPU_ACCELERATOR_TYPE")):
    return True
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto: bool = True) -> bool:
  """Explicit flags win; otherwise auto-detect a TPU pod slice. Returns whether it initialised.
  A single TPU VM host also goes through initialize() (harmless, process_count() == 1)."""
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise InputError("multi-process training needs all of --coordinator-address, "
                       "--num-processes and --process-id")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=int(num_processes), process_id=int(process_id))
    return True
  if auto and on_tpu_vm():
    jax.distributed.initialize()
    return True
  return False


def allgather_json(obj) -> list:
  """Every process's JSON-able `obj`, in process order (used for the data-iterator states)."""
  import json
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([raw.size]))   # (processes, 1)
  padded = np.zeros((int(np.max(sizes)),), np.uint8)   # allgather needs equal shapes
  padded[: raw.size] = raw
  blobs = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(b[: int(s[0])]).decode()) for b, s in zip(blobs, sizes)]


def sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
