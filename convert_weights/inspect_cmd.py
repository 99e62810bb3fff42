"""`inspect`: what a checkpoint is, its dtypes and sizes, and whether it converts cleanly."""
from __future__ import annotations

import collections
import os

import numpy as np

from convert_weights import io, ldm, sdxl_keys
from convert_weights.detect import (FORMATS, SDXL_BASE_NAME, SDXL_MOTION_NAME, controlnet_name, detect_keys,
                                    is_sdxl_folder, known_file, motion_module_family, sparse_ctrl_name)
from convert_weights.errors import ConversionError, few
from convert_weights.lora_files import kohya_lora_family

KOHYA_FAMILY = {"sdxl": "SDXL LoRA (UNet in LDM or diffusers names; lora_te1_ CLIP-L, lora_te2_ OpenCLIP bigG)",
                "sd15": "SD1.5 LoRA",
                "unknown": "LoRA for an unknown base model (no text-encoder or cross-attention layers)"}


def _summary(sd: dict) -> list[str]:
  dtypes = collections.Counter(str(v.dtype) for v in sd.values())
  n = sum(int(np.prod(v.shape)) for v in sd.values())
  return [f"tensors: {len(sd)}", f"parameters: {n:,}",
          "dtypes: " + ", ".join(f"{d} x{c}" for d, c in dtypes.most_common())]


def _check(path: str, fmt: str) -> tuple[str, list[str]]:
  """Run the matching loader; returns (detail line, notes)."""
  from convert_weights import lora_files, motion_module_files as motion, sd_base as base
  info: dict = {}
  if fmt in ("ldm", "sdxl", "diffusers_folder"):
    b = base.load_base_model(path, info=info)
    parts = [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if n in b]
    return (f"converts: {', '.join(parts)} ({'SDXL' if b['family'] == 'sdxl' else 'SD1.5'})",
            info.get("notes", []))
  if fmt.startswith("sparse_ctrl"):
    from convert_weights import sparse_ctrl_files
    _, cfg, unet = sparse_ctrl_files.load_sparse_ctrl(path, info=info)
    return (f"SparseCtrl {cfg.kind}: condition {cfg.conditioning_channels} channels"
            f"{' + mask' if cfg.concat_conditioning_mask else ''} at {cfg.condition_factor}x the latent "
            f"size, UNet channels {list(unet.block_out_channels)}, motion pe length {cfg.motion.max_len} "
            f"(buffers {'present' if info['extras'] else 'absent'})"), info.get("notes", [])
  if fmt.startswith("controlnet"):
    from convert_weights import controlnet_files
    _, cfg, unet = controlnet_files.load_controlnet(path, info=info)
    return (f"ControlNet ({info['format']}): condition {cfg.conditioning_channels} channels at "
            f"{cfg.condition_factor}x the latent size, UNet channels {list(unet.block_out_channels)}, "
            f"cross-attention {unet.cross_attention_dim}, global pooling {cfg.global_pool_conditions}"), \
        info.get("notes", [])
  if fmt.startswith("motion_module") or fmt == "unet_with_motion_modules":
    _, cfg, version = motion.load_motion_module(path, info=info)
    return (f"motion module version {version} (pe length {cfg.max_len}, mid block {cfg.mid_block}, "
            f"pe buffers {'present' if info['extras'] else 'absent'})"), info.get("notes", [])
  if fmt == "motion_lora":
    tree = lora_files.load_motion_lora(path)
  elif fmt == "domain_adapter":
    tree = lora_files.load_domain_adapter(path)
  else:
    return "", []
  from adiff_jax.params import flatten
  ranks = sorted({int(v.shape[0]) for k, v in flatten(tree).items() if k.endswith("/scale")})
  return f"LoRA layers: {len(flatten(tree)) // 3}, rank(s) {ranks}", []


def _unknown(sd: dict, fmt: str) -> list[str]:
  if fmt == "ldm":
    return [k for k in sd if not k.startswith((ldm.UNET_PREFIX, ldm.VAE_PREFIX, ldm.CLIP_PREFIX, ldm.EMA_PREFIX))]
  if fmt == "sdxl":
    return [k for k in sd if not k.startswith((ldm.UNET_PREFIX, ldm.VAE_PREFIX, sdxl_keys.CLIP_L_PREFIX,
                                               sdxl_keys.CLIP_G_PREFIX, ldm.EMA_PREFIX))]
  if fmt.startswith("motion_module"):
    return [k for k in sd if "motion_modules." not in k]
  if fmt == "kohya_lora":
    return [k for k in sd if not k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))]
  return []


def inspect(path: str, check: bool = True) -> str:
  lines = [f"path: {path}"]
  if io.is_diffusers_folder(path):
    fmt = "diffusers_folder"
    lines.append(f"format: {fmt}: {FORMATS[fmt]}")
    if is_sdxl_folder(path):
      lines.append(f"model: {SDXL_BASE_NAME}")
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
      w = io.component_weights(os.path.join(path, comp))
      if w:
        lines.append(f"  {comp}: " + "; ".join(_summary(io.load_torch_file(w))))
  else:
    info: dict = {}
    if os.path.isdir(path):
      w = io.component_weights(path)
      if w is None:
        raise ConversionError(f"{path}: a folder with no recognised weights file")
      sd = io.load_torch_file(w, info)
    else:
      sd = io.load_torch_file(path, info)
    fmt = detect_keys(sd)
    lines.append(f"format: {fmt}: {FORMATS[fmt]}")
    if fmt.startswith("sparse_ctrl"):
      lines.append(f"model: {sparse_ctrl_name(sd)}")
    if fmt == "sdxl":
      lines.append(f"model: {SDXL_BASE_NAME}")
    if fmt.startswith("controlnet"):
      lines.append(f"model: {controlnet_name(sd)}")
    if fmt == "kohya_lora":
      lines.append(f"model: {KOHYA_FAMILY[kohya_lora_family(sd)]}")
    if ((fmt.startswith("motion_module") or fmt == "unet_with_motion_modules")
        and motion_module_family(sd) == "sdxl"):
      lines.append(f"model: {SDXL_MOTION_NAME}")
    known = known_file(path, fmt)
    if known:
      lines += [f"known file: {known[1]}", f"use: {known[2]}"]
    lines += _summary(sd)
    if "animatediff_config" in info:
      lines.append(f"animatediff_config: {info['animatediff_config']}")
    unknown = _unknown(sd, fmt)
    if unknown:
      lines.append(f"keys outside the format's model prefixes: {few(unknown)}")
    if fmt == "unknown":
      lines.append(f"first keys: {few(list(sd)[:5])}")
    lines += [f"note: {n}" for n in info.get("notes", [])]
  if check and fmt not in ("unknown", "sd2", "sdxl_refiner", "diffusers_unet", "kohya_lora"):
    try:
      detail, notes = _check(path, fmt)
      lines.append(f"conversion check: ok{'; ' + detail if detail else ''}")
      lines += [f"note: {n}" for n in notes]
    except ConversionError as e:
      lines.append(f"conversion check: FAILED: {e}")
  return "\n".join(lines)
