"""Which checkpoint format a set of keys (or a folder) is: used by `inspect` and by the loaders."""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

from convert_weights import controlnet_keys, io, ldm, sdxl_keys, sparse_ctrl_keys

# format id -> human description
FORMATS = {
    "ldm": "LDM single-file SD1.x checkpoint (model.diffusion_model / first_stage_model / cond_stage_model)",
    "sd2": "LDM single-file SD2.x checkpoint (not supported yet)",
    "sdxl": "LDM single-file SDXL checkpoint (model.diffusion_model with label_emb / first_stage_model / "
            "conditioner.embedders.0 CLIP-L + conditioner.embedders.1 OpenCLIP bigG)",
    "sdxl_refiner": "SDXL refiner checkpoint (not supported: only the SDXL base model)",
    "diffusers_folder": "diffusers model folder (unet/ vae/ text_encoder/, SDXL: + text_encoder_2/)",
    "sparse_ctrl_original": "AnimateDiff SparseCtrl, original (guoyww) format",
    "sparse_ctrl_diffusers": "AnimateDiff SparseCtrl, diffusers SparseControlNetModel format",
    "controlnet_ldm": "ControlNet, LDM format (lllyasviel control_sd15_* / control_v11*_sd15_*: "
                      "control_model.* or bare input_hint_block / zero_convs)",
    "controlnet_diffusers": "ControlNet, diffusers ControlNetModel format",
    "motion_module_original": "AnimateDiff motion module, original (guoyww) format",
    "motion_module_diffusers": "AnimateDiff motion module, diffusers MotionAdapter format",
    "unet_with_motion_modules": "whole video-UNet state dict (official train.py output); motion modules are taken",
    "motion_lora": "AnimateDiff MotionLoRA (processor LoRA on the temporal attention)",
    "domain_adapter": "AnimateDiff v3 domain adapter (processor LoRA on the spatial attention)",
    "kohya_lora": "kohya / A1111 LoRA (lora_unet_* / lora_te_*; SDXL: lora_te1_* / lora_te2_*)",
    "diffusers_unet": "diffusers UNet2DConditionModel state dict",
    "unknown": "unknown format",
}


def detect_keys(keys) -> str:
  keys = list(keys)
  has = lambda s: any(s in k for k in keys)
  starts = lambda p: any(k.startswith(p) for k in keys)
  if starts("lora_unet_") or starts("lora_te_") or starts("lora_te1_") or starts("lora_te2_"):
    return "kohya_lora"
  if controlnet_keys.is_ldm_controlnet(keys):   # before "ldm": a v1.0 file also holds an SD model
    return "controlnet_ldm"
  if sdxl_keys.is_refiner(keys):
    return "sdxl_refiner"
  if sdxl_keys.is_sdxl(keys):
    return "sdxl"
  if starts("cond_stage_model.model."):
    return "sd2"
  if starts(ldm.UNET_PREFIX):
    return "ldm"
  if sparse_ctrl_keys.is_sparse_ctrl(keys):
    return "sparse_ctrl_original" if has(".temporal_transformer.") else "sparse_ctrl_diffusers"
  if controlnet_keys.is_diffusers_controlnet(keys):   # no motion modules, unlike SparseCtrl
    return "controlnet_diffusers"
  if has("_lora.down.weight") or has("_lora.up.weight"):
    return "motion_lora" if has("motion_modules.") else "domain_adapter"
  if has("motion_modules."):
    if any("motion_modules." not in k and (k.startswith("conv_in.") or ".resnets." in k) for k in keys):
      return "unet_with_motion_modules"
    return "motion_module_original" if has(".temporal_transformer.") else "motion_module_diffusers"
  if "conv_in.weight" in keys and starts("down_blocks."):
    return "diffusers_unet"
  return "unknown"


SPARSE_CTRL_KINDS = {
    "rgb": "SparseCtrl RGB (v3_sd15_sparsectrl_rgb: VAE-latent keyframes + mask, one-conv embedding)",
    "scribble": "SparseCtrl scribble (v3_sd15_sparsectrl_scribble: image keyframes + mask, "
                "ControlNet conditioning embedding)",
    "unknown": "SparseCtrl with an unknown condition embedding",
}


_MM_LEVEL = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.motion_modules\.")
SDXL_BASE_NAME = ("SDXL base model (3-level UNet with the text_time added embedding, CLIP ViT-L + "
                  "OpenCLIP ViT-bigG text encoders, VAE with scaling 0.13025)")
SDXL_MOTION_NAME = ("AnimateDiff SDXL motion module (mm_sdxl_v10_beta layout: 3 levels, no mid block; "
                    "for an SDXL base UNet)")


def motion_module_family(keys) -> str:
  """'sdxl' when the motion modules sit at down/up levels 0-2 only with no mid block (the SDXL
  UNet has 3 levels; every SD1.5 motion module has 4), else 'sd15'. Either key naming."""
  levels = {"down_blocks": set(), "up_blocks": set()}
  mid = False
  for k in keys:
    if (m := _MM_LEVEL.match(k)):
      levels[m.group(1)].add(int(m.group(2)))
    mid = mid or k.startswith("mid_block.motion_modules.")
  return "sdxl" if not mid and levels["down_blocks"] == levels["up_blocks"] == {0, 1, 2} else "sd15"


def sparse_ctrl_name(keys) -> str:
  """What inspect calls a SparseCtrl file: RGB or scribble, from its condition embedding."""
  return SPARSE_CTRL_KINDS[sparse_ctrl_keys.kind(keys)]


def controlnet_name(sd: dict) -> str:
  """What inspect calls a ControlNet file (`sd`: its tensors, for the cross-attention width)."""
  prefix = controlnet_keys.ldm_prefix(sd)
  own, rest = controlnet_keys.strip_ldm(sd, prefix) if prefix is not None else (sd, [])
  fam = controlnet_keys.family(own)
  if fam != "sd15":
    return f"{'SDXL' if fam == 'sdxl' else 'SD2.x'} ControlNet (not supported: SD1.5 ControlNets only)"
  if prefix is None:
    return "SD1.5 ControlNet (diffusers names)"
  if any(k.startswith(ldm.UNET_PREFIX) for k in rest):
    return ("SD1.5 ControlNet, v1.0 full file (control_model.* beside a whole SD1.5 model, as "
            "control_sd15_*.pth; only the ControlNet is read)")
  return f"SD1.5 ControlNet ({'keys under control_model.' if prefix else 'bare LDM keys, no control_model. prefix'})"


def is_sdxl_folder(path: str) -> bool:
  """A diffusers folder of an SDXL model: text_encoder_2/, or a UNet config with an added embedding."""
  cfg = os.path.join(path, "unet", "config.json")
  return os.path.isdir(os.path.join(path, "text_encoder_2")) or (
      os.path.isfile(cfg) and bool(io.read_json(cfg).get("addition_embed_type")))


def detect_path(path: str) -> str:
  """Format of a file or folder (reads keys only for safetensors; pickles are loaded)."""
  if io.is_diffusers_folder(path):
    return "diffusers_folder"
  if os.path.isdir(path):
    w = io.component_weights(path)  # a MotionAdapter folder: config.json + weights
    return detect_keys(io.load_torch_file(w).keys()) if w else "unknown"
  return detect_keys(io.load_torch_file(path).keys())


# ---------------------------------------------------------------- known files
_MOTION = ("motion_module_original", "motion_module_diffusers", "unet_with_motion_modules")


@dataclasses.dataclass(frozen=True)
class KnownFile:
  """A published file whose keys look like any other file of its format: recognised by its name.
  `pe_len`: the positional-encoding length its own code uses when the file stores no pe."""
  pattern: str          # regular expression on the file (or folder) name, case-insensitive
  formats: tuple        # detect_keys ids it must also have
  name: str             # what inspect calls it ({0}: the pattern's first group)
  usage: str            # how to use it here
  pe_len: Optional[int] = None


KNOWN_FILES = (
    KnownFile(r"animatelcm.*lora", ("kohya_lora",), "AnimateLCM spatial LoRA (AnimateLCM_sd15_t2v_lora)",
              "AnimateLCM merges it as W += (1/8) * scale * up @ down (alpha tensors ignored), "
              "official scale 0.8: use --lora FILE:0.1 (the default official scaling multiplies "
              "by ALPHA only)"),
    KnownFile(r"animatelcm", _MOTION, "AnimateLCM motion module (v2 layout; its file stores no pe)",
              "sample with --scheduler lcm --steps 4 --guidance-scale 1.5 --lcm-original-steps 100 "
              "(with its LoRA merged: --lora AnimateLCM_sd15_t2v_lora.safetensors:0.1)", pe_len=64),
    KnownFile(r"animatediff_lightning_(\d+)step", _MOTION, "AnimateDiff-Lightning {0}-step motion module",
              "sample with --scheduler euler --timestep-spacing trailing --steps {0} --guidance-scale 1.0"),
)


def known_file(path: str, fmt: str) -> Optional[tuple[KnownFile, str, str]]:
  """(entry, name, usage) of a known published file of format `fmt`, by its name; else None."""
  base = os.path.basename(os.path.normpath(path))
  for k in KNOWN_FILES:
    m = re.search(k.pattern, base, re.IGNORECASE)
    if m and fmt in k.formats:
      return k, k.name.format(*m.groups()), k.usage.format(*m.groups())
  return None
