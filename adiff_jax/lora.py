"""LoRA: unmerged low-rank adapters with a runtime scale (MotionLoRA, domain adapter).

LoRA weights live in their own variable collection, "lora", that mirrors the "params" tree:
for a `LoRADense` at path P the entries are

    lora/P/down  (in, r)     lora/P/up  (r, out)     lora/P/scale  (r,)

and the layer computes  y = x @ kernel + bias + ((x @ down) * scale) @ up.

Several LoRAs on the same layer are concatenated along the rank axis; the per-rank `scale`
vector carries each one's alpha, so adapters of different ranks and strengths can be active
together and their strengths changed at run time (the scale is data, not a constant: no
recompile). The base "params" are never touched unless you call `merge_lora`. The layer itself is
`adiff_jax.layers.LoRADense`; this file holds the LoRA trees and which layers they target.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from adiff_jax.errors import InputError
from adiff_jax.motion_module import is_motion_module
from adiff_jax.params import flatten, unflatten

Pytree = Any


def lora_targets(params: Pytree, where: Callable[[str], bool]) -> list[str]:
  """Paths (sep '/') of the attention projections (to_q/to_k/to_v/to_out_0 kernels) for which
  `where(path)` is true. Use `motion_lora_filter` or `domain_adapter_filter`."""
  out = []
  for path, _ in flatten(params).items():
    parts = path.split("/")
    if parts[-1] == "kernel" and parts[-2] in ("to_q", "to_k", "to_v", "to_out_0"):
      layer = "/".join(parts[:-1])
      if where(layer):
        out.append(layer)
  return out


def motion_lora_filter(path: str) -> bool:
  """MotionLoRA: the temporal attention of every motion module."""
  return is_motion_module(path)


def domain_adapter_filter(path: str) -> bool:
  """Domain adapter (v3): the spatial self- and cross-attention of the UNet."""
  return "attentions_" in path and not is_motion_module(path) and (
      "/attn1/" in path or "/attn2/" in path)


def init_lora(key: jax.Array, params: Pytree, rank: int, where: Callable[[str], bool],
              alpha: float = 1.0, dtype=jnp.float32) -> Pytree:
  """A fresh LoRA tree: down ~ N(0, 1/rank), up = 0 (so it starts as the identity edit)."""
  targets = lora_targets(params, where)
  if not targets:
    raise InputError("no attention projections matched the LoRA filter")
  flat_p = flatten(params)
  keys = jax.random.split(key, len(targets))
  flat = {}
  for k, layer in zip(keys, targets):
    d_in, d_out = flat_p[layer + "/kernel"].shape
    flat[layer + "/down"] = jax.random.normal(k, (d_in, rank), dtype) / rank
    flat[layer + "/up"] = jnp.zeros((rank, d_out), dtype)
    flat[layer + "/scale"] = jnp.full((rank,), alpha, dtype)
  return unflatten(flat)


def combine_loras(loras: Iterable[tuple[Pytree, float]]) -> Pytree:
  """Stack several LoRA trees (each with its own multiplier) into one along the rank axis."""
  merged: dict[str, list] = {}
  for tree, mult in loras:
    for path, v in flatten(tree).items():
      layer, leaf = path.rsplit("/", 1)
      merged.setdefault(layer, []).append((leaf, v, mult))
  flat = {}
  for layer, items in merged.items():
    downs = [v for leaf, v, _ in items if leaf == "down"]
    ups = [v for leaf, v, _ in items if leaf == "up"]
    scales = [v * m for leaf, v, m in items if leaf == "scale"]
    if not (len(downs) == len(ups) == len(scales)):
      raise InputError(f"LoRA layer {layer} is missing down/up/scale entries")
    flat[layer + "/down"] = jnp.concatenate(downs, axis=1)
    flat[layer + "/up"] = jnp.concatenate(ups, axis=0)
    flat[layer + "/scale"] = jnp.concatenate(scales, axis=0)
  return unflatten(flat)


def merge_lora(params: Pytree, lora: Pytree) -> Pytree:
  """Fold a LoRA tree into the base kernels: kernel += down @ (scale * up). Returns new params."""
  flat_p = dict(flatten(params))
  sub = flatten(lora)
  for path in sub:
    layer, leaf = path.rsplit("/", 1)
    if leaf != "down":
      continue
    down, up, scale = sub[layer + "/down"], sub[layer + "/up"], sub[layer + "/scale"]
    key = layer + "/kernel"
    if key not in flat_p:
      raise InputError(f"LoRA targets {layer}, which the model does not have")
    w = flat_p[key]
    delta = jnp.asarray(down, jnp.float32) @ (jnp.asarray(scale, jnp.float32)[:, None]
                                                * jnp.asarray(up, jnp.float32))
    flat_p[key] = (jnp.asarray(w, jnp.float32) + delta).astype(w.dtype)
  return unflatten(flat_p)


def check_lora_fits(lora: Pytree, params: Pytree, what: str) -> None:
  """Every layer of `lora` must exist in the UNet tree `params` with matching sizes; layers of a
  part `params` does not hold (its motion module, or its image layers) are not checked. Flax
  would silently ignore a LoRA layer the model lacks (e.g. an SD1.5 MotionLoRA's 4th level on the
  3-level SDXL motion module): this names it instead."""
  flat_p = flatten(params)
  has_mm = any(is_motion_module(p) for p in flat_p)
  has_image = any(not is_motion_module(p) for p in flat_p)
  sdxl_mm = has_mm and not any(p.startswith("down_blocks_3/motion_modules_") for p in flat_p) \
      and any(p.startswith("down_blocks_2/motion_modules_") for p in flat_p)
  for path, v in flatten(lora).items():
    layer, kind = path.rsplit("/", 1)
    mm = is_motion_module(layer)
    if not (has_mm if mm else has_image) or kind == "scale":
      continue
    hint = (" (an SD1.5 MotionLoRA on the SDXL motion module? A MotionLoRA is trained for one "
            "motion module: the SDXL one has 3 levels, 320/640/1280 channels)") if mm and sdxl_mm else ""
    k = flat_p.get(layer + "/kernel")
    if k is None:
      raise InputError(f"{what}: targets {layer}, which the model does not have{hint}")
    if kind == "down" and v.shape[0] != k.shape[0] or kind == "up" and v.shape[1] != k.shape[1]:
      raise InputError(f"{what}: shape mismatch at {layer}/{kind}: LoRA {list(v.shape)}, layer kernel "
                       f"{list(k.shape)}{hint}")
