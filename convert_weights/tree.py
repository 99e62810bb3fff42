"""The generic rule between PyTorch state-dict names and our Flax parameter trees.

    torch  down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight   (out, in)
    flax   down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel   (in, out)

Numeric segments join the name before them with "_". Leaves: 2-D `weight` -> `kernel`
transposed; 4-D conv `weight` (O, I, kh, kw) -> `kernel` (kh, kw, I, O); 1-D `weight` (norms)
-> `scale`; `bias` -> `bias`; embedding tables are named in `embeddings`.
Format-specific renames (LDM, MotionAdapter, kohya) live in their own tables and map onto the
diffusers / official names that this rule expects.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np

from adiff_jax.params import flatten, unflatten

# torch module names that genuinely end in _<digit> (not a list index).
_UNDERSCORE_DIGIT_NAMES = {"linear_1", "linear_2"}
_INDEX = re.compile(r"^(.*)_(\d+)$")


def torch_key_to_path(key: str, ndim: int, embeddings: Iterable[str] = ()) -> tuple[str, ...]:
  """'a.b.0.c.weight' -> ('a', 'b_0', 'c', 'kernel'|'scale'|'embedding')."""
  parts = key.split(".")
  module, leaf = parts[:-1], parts[-1]
  out: list[str] = []
  for p in module:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  mod = ".".join(module)
  if leaf == "weight":
    if any(mod.endswith(e) for e in embeddings):
      leaf = "embedding"
    else:
      leaf = "scale" if ndim == 1 else "kernel"
  return tuple(out) + (leaf,)


def path_to_torch_key(path: tuple[str, ...]) -> str:
  """Inverse of `torch_key_to_path`."""
  *module, leaf = path
  out = []
  for p in module:
    m = _INDEX.match(p)
    out.append(f"{m.group(1)}.{m.group(2)}" if m and p not in _UNDERSCORE_DIGIT_NAMES else p)
  torch_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  return ".".join(out + [torch_leaf])


def torch_to_flax_array(path_leaf: str, a: np.ndarray) -> np.ndarray:
  if path_leaf == "kernel":
    if a.ndim == 4:
      return np.transpose(a, (2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)
    if a.ndim == 2:
      return np.transpose(a)
  return a


def flax_to_torch_array(path_leaf: str, a: np.ndarray) -> np.ndarray:
  if path_leaf == "kernel":
    if a.ndim == 4:
      return np.transpose(a, (3, 2, 0, 1))
    if a.ndim == 2:
      return np.transpose(a)
  return a


def state_dict_to_tree(sd: Mapping[str, Any], embeddings: Iterable[str] = ()) -> dict:
  """A flat {torch_key: array} into a nested Flax params dict (arrays as numpy)."""
  tree: dict = {}
  for key, value in sd.items():
    a = np.asarray(value)
    path = torch_key_to_path(key, a.ndim, embeddings)
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    if path[-1] in node:
      raise ValueError(f"two tensors map to {'/'.join(path)} (second: {key})")
    node[path[-1]] = torch_to_flax_array(path[-1], a)
  return tree


def tree_to_state_dict(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A nested Flax params dict into a flat {torch_key: numpy array}."""
  out: dict[str, np.ndarray] = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(v, prefix + (k,))
      else:
        path = prefix + (k,)
        out[path_to_torch_key(path)] = flax_to_torch_array(k, np.asarray(v))

  walk(tree, ())
  return out


def torch_shape(path: str, shape: tuple) -> tuple:
  """The PyTorch layout of a leaf's shape, for error messages."""
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def check_tree(tree: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
  """Raise ConversionError naming missing / unexpected keys and shape mismatches (torch names,
  torch layouts) between a converted tree and the model's `jax.eval_shape` tree."""
  from convert_weights.errors import ConversionError, check_keys
  got, want = flatten(tree), flatten(expected)
  name = lambda p: path_to_torch_key(tuple(p.split("/")))
  check_keys(what, [name(p) for p in want if p not in got], [name(p) for p in got if p not in want])
  for p, w in want.items():
    g = tuple(np.shape(got[p]))
    if g != tuple(w.shape):
      raise ConversionError(f"{what}: shape mismatch at {name(p)}: checkpoint has "
                            f"{list(torch_shape(p, g))}, the model expects {list(torch_shape(p, w.shape))}")
