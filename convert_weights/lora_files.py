"""LoRA files: AnimateDiff MotionLoRA / v3 domain adapter (processor-LoRA format) <-> our "lora"
collection, and kohya / A1111 LoRAs merged into the base weights.

Processor-LoRA key table (one per layer, file shapes in brackets):

    <layer>.processor.{to_q,to_k,to_v,to_out}_lora.down.weight  [r, in]   -> <path>/down  (in, r)  = transpose
    <layer>.processor.{to_q,to_k,to_v,to_out}_lora.up.weight    [out, r]  -> <path>/up    (r, out) = transpose
    (alpha from the caller)                                                -> <path>/scale (r,)    = alpha

`to_out_lora` targets `to_out.0`. The file tensors are stored untouched (only transposed), so
an export writes back the same bytes; the strength lives in `scale` only.

kohya (`lora_unet_<module path with _>.lora_{down,up}.weight`, `.alpha`): merged into the
weights. UNet module paths in diffusers names (SD1.5) or LDM / SGM names (kohya sd-scripts' SDXL
LoRAs: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); text encoders `lora_te_`
(SD1.5), `lora_te1_` (SDXL CLIP-L) and `lora_te2_` (SDXL OpenCLIP bigG, transformers names).
Default (the official AnimateDiff `convert_lora`): W += multiplier * up @ down, the per-layer
`.alpha` is IGNORED. With kohya_scaling=True: W += multiplier * (alpha / rank) * up @ down
(sd-scripts / A1111 semantics; `convert.to_orbax` uses it for SDXL by default, as the official
sdxl branch has no kohya loader of its own).
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from convert_weights import io, ldm
from convert_weights.detect import detect_keys
from convert_weights.errors import ConversionError, few
from convert_weights.motion_module_keys import diffusers_to_official
from adiff_jax.params import flatten, unflatten
from convert_weights.tree import path_to_torch_key, torch_key_to_path, torch_to_flax_array

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
  """Every LoRA layer must exist in the model with matching in/out sizes (`adiff_jax.lora.check_lora_fits`)."""
  from adiff_jax.errors import InputError
  from adiff_jax.lora import check_lora_fits
  try:
    check_lora_fits(lora, params, what)
  except InputError as e:
    raise ConversionError(str(e)) from None


def export_lora(tree: dict, path: str) -> None:
  """Write a MotionLoRA / domain adapter back in the original processor-LoRA format."""
  io.save_torch_file(lora_state_dict(tree), path)


# ---------------------------------------------------------------- kohya
# File name prefix -> the model part it targets. SD1.5 LoRAs use lora_te_ for their one CLIP; SDXL
# LoRAs (kohya sd-scripts' LORA_PREFIX_TEXT_ENCODER1/2) lora_te1_ for CLIP-L and lora_te2_ for the
# OpenCLIP bigG encoder in transformers' names (text_model_encoder_layers_N_mlp_fc1, ...).
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}


def _kohya_prefix(name: str) -> Optional[str]:
  return next((p for p in KOHYA_PREFIXES if name.startswith(p)), None)


def _kohya_index(params: dict, ldm_names: bool = False) -> dict[str, str]:
  """'down_blocks_0_attentions_0_proj_in' -> 'down_blocks_0/attentions_0/proj_in': our paths
  joined by '_' are exactly kohya's module names for SD1.5 (both join list indices with '_').

  ldm_names (UNet): also the LDM / SGM names, which kohya sd-scripts uses for SDXL (it trains
  SDXL on its own SGM UNet): 'input_blocks_4_1_transformer_blocks_0_attn1_to_q',
  'input_blocks_1_0_in_layers_2' (conv1), 'output_blocks_2_2_conv' (an upsampler),
  'time_embed_0', 'label_emb_0_0', 'out_2' (conv_out) -- the `ldm.py` table with '.' -> '_'."""
  out = {}
  for p in flatten(params):
    layer, leaf = p.rsplit("/", 1)
    if leaf == "kernel":
      out[layer.replace("/", "_")] = layer
  if ldm_names and any(k.startswith("up_blocks_") for k in out):
    layers = {path_to_torch_key(tuple(layer.split("/")) + ("kernel",)): layer for layer in set(out.values())}
    for ldm_key, layer in ldm.unet_diffusers_to_ldm(layers).items():
      out.setdefault(ldm_key[:-len(".weight")].replace(".", "_"), layer)
  return out


def _delta(up: np.ndarray, down: np.ndarray) -> np.ndarray:
  """up @ down in torch layout: linear (out, in); conv (out, in, kh, kw). A 3x3 LoCon layer
  (down (r, in, 3, 3), up (out, r, 1, 1)) gives sum_r up[o, r] * down[r, i, kh, kw], what kohya's
  merge_to computes as conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)."""
  up32, down32 = up.astype(np.float32), down.astype(np.float32)
  r = down32.shape[0]
  d = up32.reshape(up32.shape[0], r) @ down32.reshape(r, -1)
  return d.reshape((up32.shape[0],) + down32.shape[1:]) if down32.ndim == 4 else d


def kohya_lora_family(sd: dict) -> str:
  """'sdxl', 'sd15' or 'unknown': SDXL LoRAs name their encoders lora_te1_ / lora_te2_ (SD1.5's:
  lora_te_); a UNet-only file by its cross-attention input width (2048: SDXL; 768: SD1.5)."""
  keys = list(sd)
  if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
    return "sdxl"
  if any(k.startswith("lora_te_") for k in keys):
    return "sd15"
  widths = {int(np.shape(v)[1]) for k, v in sd.items()
            if k.startswith("lora_unet_") and "attn2_to_k.lora_down" in k and len(np.shape(v)) >= 2}
  return "sdxl" if 2048 in widths else "sd15" if 768 in widths else "unknown"


def _family_hint(lora_family: str, model_family: str) -> str:
  if "unknown" in (lora_family, model_family) or lora_family == model_family:
    return ""
  name = {"sdxl": "SDXL", "sd15": "SD1.5"}
  return f" (an {name[lora_family]} LoRA on an {name[model_family]} model?)"


def merge_kohya_lora_parts(params: dict, path: str, alpha: float = 0.8, kohya_scaling: bool = False,
                           info: Optional[dict] = None) -> dict:
  """Merge a kohya / A1111 LoRA into a base model's parts; returns new trees (inputs untouched).

  params: {"unet", "text_encoder"[, "text_encoder_2"]} (any subset; SDXL: both encoders).
  lora_unet_ layers resolve by diffusers names (SD1.5 kohya, some SDXL trainers) or LDM / SGM
  names (kohya sd-scripts' SDXL LoRAs); lora_te_ / lora_te1_ go to "text_encoder", lora_te2_ to
  "text_encoder_2". alpha is the multiplier (the official repo's `lora_alpha`, default 0.8); see
  the module docstring for the scaling choice. Layers the model does not have are an error.
  """
  sd = io.load_torch_file(path, info)
  if detect_keys(sd) != "kohya_lora":
    raise ConversionError(f"{path}: not a kohya LoRA (no lora_unet_* / lora_te_* / lora_te1_* / lora_te2_* keys)")
  odd = [k for k in sd if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
  if odd:
    raise ConversionError(f"{path}: unsupported LoRA tensors (LoHa / LoKr / DoRA?): {few(odd)}")
  model_family = "sdxl" if "text_encoder_2" in params or "add_embedding" in (params.get("unet") or {}) \
      else "sd15" if params.get("unet") or params.get("text_encoder") else "unknown"
  hint = _family_hint(kohya_lora_family(sd), model_family)
  index = {part: _kohya_index(tree, ldm_names=part == "unet") for part, tree in params.items() if tree is not None}
  flats = {part: flatten(tree) for part, tree in params.items() if tree is not None}
  unmatched, merged, ignored_alpha = [], 0, set()
  for k in sd:
    if not k.endswith(".lora_down.weight"):
      continue
    name = k[:-len(".lora_down.weight")]
    prefix = _kohya_prefix(name)
    part = KOHYA_PREFIXES.get(prefix)
    short = name[len(prefix):] if prefix else name
    idx = index.get(part, {})
    layer = idx.get(short)
    if layer is None and part != "unet":  # some trainers omit text_model_
      layer = idx.get("text_model_" + short)
    if layer is None:
      unmatched.append(name)
      continue
    down, up = sd[k], sd.get(name + ".lora_up.weight")
    if up is None:
      raise ConversionError(f"{path}: {name} has lora_down but no lora_up")
    scale = alpha
    if name + ".alpha" in sd:
      ratio = float(np.asarray(sd[name + ".alpha"], np.float32).reshape(-1)[0]) / down.shape[0]
      if kohya_scaling:
        scale = alpha * ratio
      elif ratio != 1.0:
        ignored_alpha.add(round(ratio, 6))
    flat = flats[part]
    kernel = flat[layer + "/kernel"]
    delta = torch_to_flax_array("kernel", _delta(up, down))
    if delta.size != kernel.size:
      raise ConversionError(f"{path}: shape mismatch at {name}: LoRA delta {list(delta.shape)} "
                            f"vs layer kernel {list(kernel.shape)}{hint}")
    delta = delta.reshape(kernel.shape)  # e.g. 1x1 conv LoRA onto a (1, 1, in, out) kernel
    flat[layer + "/kernel"] = (np.asarray(kernel, np.float32) + scale * delta).astype(kernel.dtype)
    merged += 1
  if unmatched:
    parts = {KOHYA_PREFIXES[p] for n in unmatched if (p := _kohya_prefix(n))}
    missing = sorted(p for p in parts if p not in index)
    extra = f"; the model has no {', '.join(missing)}" if missing else ""
    raise ConversionError(f"{path}: LoRA layers not found in the model: {few(unmatched)}{extra}{hint}")
  if info is not None:
    notes = info.setdefault("notes", [])
    notes.append(f"merged {merged} kohya LoRA layers from {path}")
    if ignored_alpha:
      notes.append(f"{path}: its alpha/rank ({', '.join(map(str, sorted(ignored_alpha)))}) is ignored by the "
                   "default (official AnimateDiff) scaling; --kohya-scaling applies it (A1111 / ComfyUI / "
                   "diffusers semantics)")
  return {part: (unflatten(flats[part]) if part in flats else None) for part in params}


def merge_kohya_lora(params_unet: Optional[dict], params_text: Optional[dict], path: str,
                     alpha: float = 0.8, kohya_scaling: bool = False,
                     info: Optional[dict] = None) -> tuple[Optional[dict], Optional[dict]]:
  """SD1.5 form of `merge_kohya_lora_parts`: (unet, text_encoder) in, (unet, text_encoder) out
  (lora_te2_ layers are reported as not found)."""
  out = merge_kohya_lora_parts({"unet": params_unet, "text_encoder": params_text}, path, alpha,
                               kohya_scaling, info)
  return out["unet"], out["text_encoder"]
