"""Device mesh for video diffusion: batch on `data`, frames on `frames`.

Model code calls `constrain(x, spec)`, a no-op unless a mesh is active (`jax.set_mesh`), so
the same modules run unsharded in tests and sharded under a mesh.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from adiff_jax.errors import InputError

DATA, FRAMES = "data", "frames"


def make_mesh(data: Optional[int] = None, frames: int = 1, devices=None) -> Mesh:
  """A (data, frames) mesh over `devices` (default: all); `data` defaults to n_devices // frames."""
  devices = list(jax.devices() if devices is None else devices)
  if data is None:
    if len(devices) % frames:
      raise InputError(f"{len(devices)} devices cannot be split into frames={frames} groups")
    data = len(devices) // frames
  if data * frames > len(devices):
    raise InputError(f"mesh data={data} x frames={frames} needs {data * frames} devices, "
                     f"only {len(devices)} available")
  arr = np.asarray(devices[: data * frames]).reshape(data, frames)
  return Mesh(arr, (DATA, FRAMES), axis_types=(AxisType.Auto, AxisType.Auto))


def video_sharding(mesh: Mesh, ndim: int = 5) -> NamedSharding:
  """Sharding of a (B, F, ...) array: batch over `data`, frames over `frames`."""
  return NamedSharding(mesh, P(DATA, FRAMES, *([None] * (ndim - 2))))


def _active_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, spec: Sequence[Optional[str]]) -> jax.Array:
  """`with_sharding_constraint(x, P(*spec))` under an active mesh, dropping axes the mesh lacks
  or that do not divide the dimension; identity without a mesh."""
  mesh = _active_mesh()
  if mesh is None:
    return x
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  clean = []
  for dim, name in zip(x.shape, spec):
    ok = name is not None and name in sizes and dim % sizes[name] == 0
    clean.append(name if ok else None)
  clean += [None] * (x.ndim - len(clean))
  return jax.lax.with_sharding_constraint(x, P(*clean))
