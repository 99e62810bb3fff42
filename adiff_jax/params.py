"""Fast random parameters: shapes from `jax.eval_shape(module.init)`, values from numpy.

XLA takes ~30 s on CPU to compile `jax.jit(model.init)` even for a tiny UNet (one threefry
RNG kernel per parameter), longer than the forward pass. Tests, the built-in demo model and
fresh training runs use this instead.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import traverse_util

Pytree = Any


def _zero_init(path: tuple[str, ...]) -> bool:
  # Motion modules start as the identity (zero proj_out), as in the official training code.
  return path[-2:-1] == ("proj_out",) and any(p.startswith("motion_modules_") for p in path)


def random_like(shapes: Pytree, seed: int | np.random.Generator = 0) -> Pytree:
  """numpy f32 values for a tree of shapes: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02),
  norm scales 1, biases 0, motion-module proj_out 0."""
  rng = np.random.default_rng(seed)  # a Generator passes through unchanged
  flat = {}
  for path, s in traverse_util.flatten_dict(shapes).items():
    name = path[-1]
    if name == "kernel" and not _zero_init(path):
      a = rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))
    elif name == "embedding":
      a = rng.standard_normal(s.shape) * 0.02
    elif name == "scale":
      a = np.ones(s.shape)
    else:
      a = np.zeros(s.shape)
    flat[path] = a.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def random_init(module, *args, seed: int = 0, **kwargs) -> Pytree:
  """Random "params" of `module` for example inputs `args` (nothing is compiled)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return random_like(shapes["params"], seed)
