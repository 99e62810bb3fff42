"""Key tables of SDXL single files (A1111 / Civitai / Stability's `sd_xl_base_1.0.safetensors`).

    model.diffusion_model.*                 UNet, LDM names as SD1.5 (`ldm.py`) plus
                                            label_emb.0.{0,2} (the added text_time embedding)
    first_stage_model.*                     VAE, as SD1.5
    conditioner.embedders.0.transformer.*   CLIP ViT-L: text_model.* exactly as transformers
    conditioner.embedders.1.model.*         OpenCLIP ViT-bigG, OpenCLIP's own names:
        token_embedding.weight, positional_embedding (77, C), ln_final.{weight,bias},
        text_projection (C, P), used as x @ text_projection: the transpose of transformers'
          `text_projection.weight` (P, C),
        transformer.resblocks.N.{ln_1, ln_2, attn.in_proj_weight (3C, C) / in_proj_bias (3C,)
          (q, k, v stacked), attn.out_proj, mlp.c_fc, mlp.c_proj},
        logit_scale (the CLIP training temperature, unused: kept aside for export)

Names as in diffusers' `single_file_utils.convert_open_clip_checkpoint` (which tests check this
table against). The SDXL refiner has only an OpenCLIP embedder, `conditioner.embedders.0.model.*`.
Everything here is renaming, the q/k/v split (row slices) and one transpose: bit-exact both ways.
"""
from __future__ import annotations

import re

import numpy as np

from convert_weights import ldm

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
REFINER_CLIP_G_PREFIX = "conditioner.embedders.0.model."
# OpenCLIP tensors that are not part of the text tower's forward pass: kept only for export.
OPEN_CLIP_EXTRAS = ("logit_scale",)

_G_FIXED = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
            "positional_embedding": "text_model.embeddings.position_embedding.weight",
            "ln_final.weight": "text_model.final_layer_norm.weight",
            "ln_final.bias": "text_model.final_layer_norm.bias"}
_G_BLOCK = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
            ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.*)$")
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.*)$")


def is_sdxl(keys) -> bool:
  """An SDXL single file (base or refiner): conditioner embedders or the UNet's label_emb."""
  return any(k.startswith("conditioner.embedders.") or k.startswith(ldm.UNET_PREFIX + "label_emb.")
             for k in keys)


def is_refiner(keys) -> bool:
  """The SDXL refiner: its only text encoder, OpenCLIP, is embedder 0."""
  return any(k.startswith(REFINER_CLIP_G_PREFIX) for k in keys)


def open_clip_to_transformers(sd: dict) -> tuple[dict, dict]:
  """OpenCLIP text-tower state dict (no prefix) -> (transformers CLIPTextModelWithProjection
  names, the OPEN_CLIP_EXTRAS found). Unknown keys pass through unchanged (the tree check then
  reports them as unexpected)."""
  out, extras = {}, {}
  for k, v in sd.items():
    if k in OPEN_CLIP_EXTRAS:
      extras[k] = v
    elif k in _G_FIXED:
      out[_G_FIXED[k]] = v
    elif k == "text_projection":
      out["text_projection.weight"] = np.asarray(v).T  # x @ P (C, P) == Linear with weight P.T
    elif m := _RESBLOCK.match(k):
      n, rest = m.groups()
      pre = f"text_model.encoder.layers.{n}."
      if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        leaf = "weight" if rest.endswith("weight") else "bias"
        for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(v), 3, axis=0)):
          out[f"{pre}self_attn.{name}.{leaf}"] = part
      else:
        out[pre + ldm._rename(rest, _G_BLOCK)] = v
    else:
      out[k] = v
  return out, extras


def transformers_to_open_clip(sd: dict) -> dict:
  """Inverse of `open_clip_to_transformers` (transformers names, with `text_model.`)."""
  inv = {v: k for k, v in _G_FIXED.items()}
  out, qkv = {}, {}
  for k, v in sd.items():
    if k in inv:
      out[inv[k]] = v
    elif k == "text_projection.weight":
      out["text_projection"] = np.asarray(v).T
    elif m := _HF_LAYER.match(k):
      n, rest = m.groups()
      if mm := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest):
        qkv.setdefault((n, mm.group(2)), {})[mm.group(1)] = v
      else:
        out[f"transformer.resblocks.{n}.{ldm._rename(rest, _G_BLOCK, reverse=True)}"] = v
    else:
      out[k] = v
  for (n, leaf), parts in qkv.items():
    if sorted(parts) != ["k", "q", "v"]:
      raise ValueError(f"layer {n}: q/k/v {leaf} incomplete ({sorted(parts)})")
    out[f"transformer.resblocks.{n}.attn.in_proj_{leaf}"] = np.concatenate(
        [np.asarray(parts[c]) for c in "qkv"], axis=0)
  return out


def split_sdxl(sd: dict) -> tuple[dict, dict, dict, dict, dict, list[str]]:
  """(unet, vae, clip_l, clip_g, other, ema_keys) of an SDXL single file, prefixes removed."""
  clip_l, clip_g, rest = {}, {}, {}
  for k, v in sd.items():
    if k.startswith(CLIP_L_PREFIX):
      clip_l[k[len(CLIP_L_PREFIX):]] = v
    elif k.startswith(CLIP_G_PREFIX):
      clip_g[k[len(CLIP_G_PREFIX):]] = v
    else:
      rest[k] = v
  unet, vae, _, other, ema = ldm.split_ldm(rest)
  return unet, vae, clip_l, clip_g, other, ema


def join_sdxl(unet: dict, vae: dict, clip_l: dict, clip_g: dict, other: dict | None = None) -> dict:
  """Diffusers-named UNet / VAE, transformers-named CLIP-L and bigG -> an SDXL single file."""
  out = ldm.join_ldm(unet, vae, {})
  out.update({CLIP_L_PREFIX + k: v for k, v in ldm.clip_diffusers_to_ldm(clip_l).items()} if clip_l else {})
  out.update({CLIP_G_PREFIX + k: v for k, v in transformers_to_open_clip(clip_g).items()} if clip_g else {})
  out.update(other or {})
  return out
