"""Which checkpoint format a set of keys (or a folder) is: used by `inspect` and by the loaders."""
from __future__ import annotations

import os

from convert_weights import io, ldm

# format id -> human description
FORMATS = {
    "ldm": "LDM single-file SD1.x checkpoint (model.diffusion_model / first_stage_model / cond_stage_model)",
    "sd2": "LDM single-file SD2.x checkpoint (not supported yet)",
    "sdxl": "SDXL checkpoint (not supported yet)",
    "diffusers_folder": "diffusers model folder (unet/ vae/ text_encoder/)",
    "motion_module_original": "AnimateDiff motion module, original (guoyww) format",
    "motion_module_diffusers": "AnimateDiff motion module, diffusers MotionAdapter format",
    "unet_with_motion_modules": "whole video-UNet state dict (official train.py output); motion modules are taken",
    "motion_lora": "AnimateDiff MotionLoRA (processor LoRA on the temporal attention)",
    "domain_adapter": "AnimateDiff v3 domain adapter (processor LoRA on the spatial attention)",
    "kohya_lora": "kohya / A1111 LoRA (lora_unet_* / lora_te_*)",
    "diffusers_unet": "diffusers UNet2DConditionModel state dict",
    "unknown": "unknown format",
}


def detect_keys(keys) -> str:
  keys = list(keys)
  has = lambda s: any(s in k for k in keys)
  starts = lambda p: any(k.startswith(p) for k in keys)
  if starts("lora_unet_") or starts("lora_te_"):
    return "kohya_lora"
  if starts("conditioner.embedders.") or starts(ldm.UNET_PREFIX + "label_emb."):
    return "sdxl"
  if starts("cond_stage_model.model."):
    return "sd2"
  if starts(ldm.UNET_PREFIX):
    return "ldm"
  if has("_lora.down.weight") or has("_lora.up.weight"):
    return "motion_lora" if has("motion_modules.") else "domain_adapter"
  if has("motion_modules."):
    if any("motion_modules." not in k and (k.startswith("conv_in.") or ".resnets." in k) for k in keys):
      return "unet_with_motion_modules"
    return "motion_module_original" if has(".temporal_transformer.") else "motion_module_diffusers"
  if "conv_in.weight" in keys and starts("down_blocks."):
    return "diffusers_unet"
  return "unknown"


def detect_path(path: str) -> str:
  """Format of a file or folder (reads keys only for safetensors; pickles are loaded)."""
  if io.is_diffusers_folder(path):
    return "diffusers_folder"
  if os.path.isdir(path):
    w = io.component_weights(path)  # a MotionAdapter folder: config.json + weights
    return detect_keys(io.load_torch_file(w).keys()) if w else "unknown"
  return detect_keys(io.load_torch_file(path).keys())
