"""Parameter trees: the one set of tree helpers, dtype names, and fast random parameters.

Trees are plain nested dicts named after the PyTorch state dicts; a *path* is the '/'-joined
key of a leaf ("down_blocks_0/attentions_0/proj_in/kernel").

Random parameters take their shapes from `jax.eval_shape(module.init)` and their values from
numpy: XLA takes ~30 s on CPU to compile `jax.jit(model.init)` even for a tiny UNet (one
threefry RNG kernel per parameter), longer than the forward pass.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from adiff_jax.errors import InputError

Pytree = Any

# The one dtype-name table: what configs, the CLIs and metadata.json call each dtype.
DTYPES = {"f32": np.float32, "fp32": np.float32, "f16": np.float16, "fp16": np.float16,
          "bf16": ml_dtypes.bfloat16}


def dtype(name: str):
  """'f32' / 'fp32' / 'fp16' / 'bf16' -> the numpy / JAX dtype."""
  if name not in DTYPES:
    raise InputError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
  return jnp.dtype(DTYPES[name])


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  out: dict[str, Any] = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(v, prefix + (k,))
      else:
        out["/".join(prefix + (k,))] = v

  walk(tree or {}, ())
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: dict = {}
  for path, v in flat.items():
    *mods, leaf = path.split("/")
    node = tree
    for p in mods:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def split(tree: Mapping[str, Any], where: Callable[[str], bool]) -> tuple[dict, dict]:
  """(leaves whose path satisfies `where`, the rest) as two nested dicts."""
  yes, no = {}, {}
  for k, v in flatten(tree).items():
    (yes if where(k) else no)[k] = v
  return unflatten(yes), unflatten(no)


def merge(*trees: Mapping[str, Any]) -> dict:
  """Union of nested dicts with disjoint leaves (e.g. an image UNet and a motion module)."""
  flat: dict[str, Any] = {}
  for t in trees:
    for k, v in flatten(t).items():
      if k in flat:
        raise InputError(f"both trees define {k}")
      flat[k] = v
  return unflatten(flat)


def cast_tree(tree: Pytree, name: Optional[str], skip_leaf: tuple[str, ...] = ()) -> Pytree:
  """Floating leaves to the dtype `name` (see DTYPES; None or "keep": unchanged), as numpy.
  Leaves named in `skip_leaf` (e.g. a LoRA's `scale`) keep theirs."""
  if name in (None, "keep"):
    return tree
  target = dtype(name)
  out = {}
  for k, v in flatten(tree).items():
    v = np.asarray(v)
    floating = np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16
    out[k] = v.astype(target) if floating and k.rsplit("/", 1)[-1] not in skip_leaf else v
  return unflatten(out)


def random_like(shapes: Pytree, seed: int | np.random.Generator = 0,
                zero: Callable[[str], bool] = lambda path: False) -> Pytree:
  """numpy f32 values for a tree of shapes: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02),
  norm scales 1, biases 0; kernels whose path satisfies `zero` are 0 (see
  `model.random_params`: a fresh motion module is the identity)."""
  rng = np.random.default_rng(seed)  # a Generator passes through unchanged
  flat = {}
  for path, s in traverse_util.flatten_dict(shapes).items():
    name = path[-1]
    if name == "kernel" and not zero("/".join(path)):
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
