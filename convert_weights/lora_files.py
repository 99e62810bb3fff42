"""LoRA files: AnimateDiff MotionLoRA / v3 domain adapter (processor-LoRA format) <-> our "lora"
collection, and kohya / A1111 LoRAs merged into the base weights.

Processor-LoRA key table (one per layer, file shapes in brackets):

    <layer>.processor.{to_q,to_k,to_v,to_out}_lora.down.weight  [r, in]   -> <path>/down  (in, r)  = transpose
    <layer>.processor.{to_q,to_k,to_v,to_out}_lora.up.weight    [out, r]  -> <path>/up    (r, out) = transpose
    (alpha from the caller)                                                -> <path>/scale (r,)    = alpha

`to_out_lora` targets `to_out.0`. The file tensors are stored untouched (only transposed), so
an export writes back the same bytes; the strength lives in `scale` only.

kohya (`lora_unet_<module path with _>.lora_{down,up}.weight`, `.alpha`): merged into the
weights. Default (the official AnimateDiff `convert_lora`): W += multiplier * up @ down, the
per-layer `.alpha` is IGNORED. With kohya_scaling=True: W += multiplier * (alpha / rank) * up @ down
(sd-scripts / A1111 semantics).
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from convert_weights import io
from convert_weights.detect import detect_keys
from convert_weights.errors import ConversionError, few
from convert_weights.motion_module_keys import diffusers_to_official
from adiff_jax.params import flatten, unflatten
from convert_weights.tree import torch_key_to_path, torch_to_flax_array

_PROC = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TARGET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def _read(path: str, want: str, info: Optional[dict]) -> dict:
  sd = io.load_torch_file(path, info)
  fmt = detect_keys(sd)
  if fmt != want:
    raise ConversionError(f"{path}: expected a {want.replace('_', ' ')} file, found {fmt}")
  bad = [k for k in sd if not _PROC.match(k)]
  if bad:
    raise ConversionError(f"{path}: unexpected keys: {few(bad)}")
  return sd


def lora_tree_from_state_dict(sd: dict, alpha: float) -> dict:
  """Processor-LoRA state dict -> our lora tree (paths mirror the params tree)."""
  flat = {}
  for k, v in sd.items():
    layer, proj, kind = _PROC.match(k).groups()
    if "motion_modules." in layer and ".temporal_transformer." not in layer:
      layer = diffusers_to_official(layer + ".x")[:-2]  # diffusers attn1/attn2 naming
    path = "/".join(torch_key_to_path(f"{layer}.{_TARGET[proj]}.weight", 2)[:-1])
    if v.ndim != 2:
      raise ConversionError(f"{k}: expected a 2-D LoRA matrix, got shape {list(v.shape)}")
    flat[f"{path}/{kind}"] = np.transpose(v)  # down [r, in] -> (in, r); up [out, r] -> (r, out)
  layers = {p.rsplit("/", 1)[0] for p in flat}
  for layer in sorted(layers):
    down, up = flat.get(layer + "/down"), flat.get(layer + "/up")
    if down is None or up is None:
      raise ConversionError(f"LoRA layer {layer}: missing its {'down' if down is None else 'up'} matrix")
    if down.shape[1] != up.shape[0]:
      raise ConversionError(f"LoRA layer {layer}: shape mismatch: down rank {down.shape[1]} vs up rank {up.shape[0]}")
    flat[layer + "/scale"] = np.full((down.shape[1],), alpha, np.float32)
  return unflatten(flat)


def lora_state_dict(tree: dict) -> dict:
  """Our lora tree -> processor-LoRA state dict (inverse of `lora_tree_from_state_dict`)."""
  from convert_weights.tree import path_to_torch_key
  out = {}
  inv = {v: k for k, v in _TARGET.items()}
  for path, v in flatten(tree).items():
    layer, kind = path.rsplit("/", 1)
    if kind == "scale":
      continue
    tk = path_to_torch_key(tuple(layer.split("/")) + ("kernel",))[:-len(".weight")]
    mod, proj = (tk[:-len(".to_out.0")], "to_out.0") if tk.endswith(".to_out.0") else tk.rsplit(".", 1)
    out[f"{mod}.processor.{inv[proj]}_lora.{kind}.weight"] = np.transpose(np.asarray(v))
  return out


def load_motion_lora(path: str, alpha: float = 1.0, info: Optional[dict] = None) -> dict:
  """A MotionLoRA file -> lora tree on the motion modules' temporal attention (scale = alpha)."""
  return lora_tree_from_state_dict(_read(path, "motion_lora", info), alpha)


def load_domain_adapter(path: str, scale: float = 1.0, info: Optional[dict] = None) -> dict:
  """The v3 domain adapter (`v3_sd15_adapter.ckpt`) -> lora tree on the spatial attention."""
  return lora_tree_from_state_dict(_read(path, "domain_adapter", info), scale)


def check_lora_targets(lora: dict, params: dict, what: str) -> None:
  """Every LoRA layer must exist in the model with matching in/out sizes."""
  flat_p = flatten(params)
  for path, v in flatten(lora).items():
    layer, kind = path.rsplit("/", 1)
    k = flat_p.get(layer + "/kernel")
    if k is None:
      raise ConversionError(f"{what}: targets {layer}, which the model does not have")
    if kind == "down" and v.shape[0] != k.shape[0] or kind == "up" and v.shape[1] != k.shape[1]:
      raise ConversionError(f"{what}: shape mismatch at {layer}/{kind}: LoRA {list(v.shape)}, "
                            f"layer kernel {list(k.shape)}")


def export_lora(tree: dict, path: str) -> None:
  """Write a MotionLoRA / domain adapter back in the original processor-LoRA format."""
  io.save_torch_file(lora_state_dict(tree), path)


# ---------------------------------------------------------------- kohya
def _kohya_index(params: dict) -> dict[str, str]:
  """'down_blocks_0_attentions_0_proj_in' -> 'down_blocks_0/attentions_0/proj_in': our paths
  joined by '_' are exactly kohya's module names (both join list indices with '_')."""
  out = {}
  for p in flatten(params):
    layer, leaf = p.rsplit("/", 1)
    if leaf == "kernel":
      out[layer.replace("/", "_")] = layer
  return out


def _delta(up: np.ndarray, down: np.ndarray) -> np.ndarray:
  """up @ down in torch layout: linear (out, in); conv (out, in, kh, kw)."""
  up32, down32 = up.astype(np.float32), down.astype(np.float32)
  r = down32.shape[0]
  d = up32.reshape(up32.shape[0], r) @ down32.reshape(r, -1)
  return d.reshape((up32.shape[0],) + down32.shape[1:]) if down32.ndim == 4 else d


def merge_kohya_lora(params_unet: Optional[dict], params_text: Optional[dict], path: str,
                     alpha: float = 0.8, kohya_scaling: bool = False,
                     info: Optional[dict] = None) -> tuple[Optional[dict], Optional[dict]]:
  """Merge a kohya LoRA into the UNet and text-encoder trees; returns new trees (inputs untouched).

  alpha is the multiplier (the official repo's `lora_alpha`, default 0.8). See the module
  docstring for the scaling choice.
  """
  sd = io.load_torch_file(path, info)
  if detect_keys(sd) != "kohya_lora":
    raise ConversionError(f"{path}: not a kohya LoRA (no lora_unet_* / lora_te_* keys)")
  odd = [k for k in sd if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
  if odd:
    raise ConversionError(f"{path}: unsupported LoRA tensors (LoHa / LoKr / DoRA?): {few(odd)}")
  targets = {"lora_unet_": (params_unet, _kohya_index(params_unet or {})),
             "lora_te_": (params_text, _kohya_index(params_text or {}))}
  flats = {"lora_unet_": flatten(params_unet or {}), "lora_te_": flatten(params_text or {})}
  unmatched, merged = [], 0
  for k in sd:
    if not k.endswith(".lora_down.weight"):
      continue
    name = k[:-len(".lora_down.weight")]
    prefix = "lora_unet_" if name.startswith("lora_unet_") else "lora_te_"
    params, index = targets[prefix]
    layer = index.get(name[len(prefix):])
    if layer is None and prefix == "lora_te_":  # some trainers omit text_model_
      layer = index.get("text_model_" + name[len(prefix):])
    if layer is None or params is None:
      unmatched.append(name)
      continue
    down, up = sd[k], sd.get(name + ".lora_up.weight")
    if up is None:
      raise ConversionError(f"{path}: {name} has lora_down but no lora_up")
    scale = alpha
    if kohya_scaling and name + ".alpha" in sd:
      scale = alpha * float(np.asarray(sd[name + ".alpha"], np.float32).reshape(-1)[0]) / down.shape[0]
    flat = flats[prefix]
    kernel = flat[layer + "/kernel"]
    delta = torch_to_flax_array("kernel", _delta(up, down))
    if delta.size != kernel.size:
      raise ConversionError(f"{path}: shape mismatch at {name}: LoRA delta {list(delta.shape)} "
                            f"vs layer kernel {list(kernel.shape)}")
    delta = delta.reshape(kernel.shape)  # e.g. 1x1 conv LoRA onto a (1, 1, in, out) kernel
    flat[layer + "/kernel"] = (np.asarray(kernel, np.float32) + scale * delta).astype(kernel.dtype)
    merged += 1
  if unmatched:
    raise ConversionError(f"{path}: LoRA layers not found in the model: {few(unmatched)}")
  if info is not None:
    info.setdefault("notes", []).append(f"merged {merged} kohya LoRA layers from {path}")
  return (unflatten(flats["lora_unet_"]) if params_unet is not None else None,
          unflatten(flats["lora_te_"]) if params_text is not None else None)
