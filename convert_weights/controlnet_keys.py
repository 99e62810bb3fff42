"""ControlNet key table: LDM (lllyasviel `cldm`) names <-> diffusers `ControlNetModel` names.

LDM (`control_sd15_*.pth` v1.0 under `control_model.` beside a whole SD1.5 model;
`control_v11*_sd15_*.pth` v1.1 under `control_model.` alone; some re-saved `.safetensors`
without the prefix, which diffusers' and ComfyUI's loaders accept too):

    time_embed.{0,2}                  time_embedding.linear_{1,2}
    input_blocks.0.0                  conv_in
    input_blocks.N / middle_block.N   down_blocks / mid_block, exactly as the UNet (`ldm.py`)
    input_hint_block.0                controlnet_cond_embedding.conv_in
    input_hint_block.2k+2             controlnet_cond_embedding.blocks.k   (odd indices: SiLU)
    input_hint_block.<last>           controlnet_cond_embedding.conv_out   (14 for SD1.5)
    zero_convs.N.0                    controlnet_down_blocks.N
    middle_block_out.0                controlnet_mid_block

Our tree uses the diffusers names (through `convert_weights.tree`'s generic rule), so a
diffusers file needs no renaming at all.
"""
from __future__ import annotations

import re
from typing import Optional

from convert_weights import ldm

LDM_PREFIX = "control_model."
_HINT = re.compile(r"^input_hint_block\.(\d+)\.(.*)$")
_ZERO = re.compile(r"^zero_convs\.(\d+)\.0\.(.*)$")
_EMB = re.compile(r"^controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.*)$")


def ldm_prefix(keys) -> Optional[str]:
  """"control_model." or "" for an LDM ControlNet (its zero convs or hint block under that
  prefix or bare), None for anything else."""
  for p in (LDM_PREFIX, ""):
    has = lambda s: any(k.startswith(p + s) for k in keys)
    if has("zero_convs.") and (has("input_hint_block.") or has("middle_block_out.")):
      return p
  return None


def is_ldm_controlnet(keys) -> bool:
  return ldm_prefix(list(keys)) is not None


def is_diffusers_controlnet(keys) -> bool:
  """diffusers ControlNetModel names: the condition embedding's conv_in and the residual convs,
  no motion modules (those make it a SparseCtrl)."""
  keys = list(keys)
  return (any(k.startswith("controlnet_cond_embedding.conv_in.") for k in keys)
          and any(k.startswith("controlnet_down_blocks.") for k in keys)
          and not any("motion_modules." in k for k in keys))


def strip_ldm(sd: dict, prefix: str) -> tuple[dict, list[str]]:
  """(the ControlNet's tensors without the prefix, the other keys: a v1.0 file's SD model)."""
  if not prefix:
    return dict(sd), []
  out, rest = {}, []
  for k, v in sd.items():
    if k.startswith(prefix):
      out[k[len(prefix):]] = v
    else:
      rest.append(k)
  return out, rest


def ldm_to_diffusers(sd: dict) -> dict:
  """An LDM ControlNet state dict without prefix -> diffusers names (unknown keys kept as
  they are, so the tree check reports them)."""
  layers = ldm.unet_layers_per_block(sd)
  hints = [int(m.group(1)) for k in sd if (m := _HINT.match(k))]
  last = max(hints) if hints else -1
  out = {}
  for k, v in sd.items():
    if m := _HINT.match(k):
      i, rest = int(m.group(1)), m.group(2)
      if i == 0:
        name = "conv_in"
      elif i == last:
        name = "conv_out"
      elif i % 2 == 0:
        name = f"blocks.{i // 2 - 1}"
      else:                                  # an odd index is a SiLU: no weights; report it
        name = f"unknown_{i}"
      nk = f"controlnet_cond_embedding.{name}.{rest}"
    elif m := _ZERO.match(k):
      nk = f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    elif k.startswith("middle_block_out.0."):
      nk = "controlnet_mid_block." + k[len("middle_block_out.0."):]
    else:
      nk = ldm.unet_key_ldm_to_diffusers(k, layers)
    out[nk] = v
  return out


def diffusers_to_ldm(sd: dict) -> dict:
  """A diffusers ControlNet state dict -> LDM names without prefix."""
  layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)))
  blocks = {int(m.group(2)) for k in sd if (m := _EMB.match(k)) and m.group(2) is not None}
  out = {}
  for k, v in sd.items():
    if m := _EMB.match(k):
      part, idx, rest = m.groups()
      i = 0 if part == "conv_in" else 2 * (len(blocks) + 1) if part == "conv_out" else 2 * int(idx) + 2
      nk = f"input_hint_block.{i}.{rest}"
    elif m := re.match(r"^controlnet_down_blocks\.(\d+)\.(.*)$", k):
      nk = f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    elif k.startswith("controlnet_mid_block."):
      nk = "middle_block_out.0." + k[len("controlnet_mid_block."):]
    else:
      nk = ldm.unet_key_diffusers_to_ldm(k, layers, set())
    out[nk] = v
  return out


def family(sd: dict) -> str:
  """"sd15", "sdxl" (added text/time embedding) or "sd2" (1024-wide cross-attention) of a
  ControlNet state dict in either naming (with or without prefix)."""
  if any(("label_emb." in k) or k.startswith("add_embedding.") for k in sd):
    return "sdxl"
  k2 = next((k for k in sd if k.endswith("attn2.to_k.weight")), None)
  if k2 is not None and len(getattr(sd[k2], "shape", ())) == 2 and sd[k2].shape[1] == 1024:
    return "sd2"
  return "sd15"
