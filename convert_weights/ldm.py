"""Key tables: original LDM single-file (CompVis / A1111 / Civitai) names <-> diffusers names.

An SD1.x single file holds three models under fixed prefixes:

    model.diffusion_model.*          UNet   (input_blocks / middle_block / output_blocks)
    first_stage_model.*              VAE    (encoder.down.i.block.j, mid.attn_1, decoder.up.b ...)
    cond_stage_model.transformer.*   CLIP   (text_model.* exactly as transformers names it)

SDXL files use the same UNet (plus `label_emb`) and VAE names; their two text encoders sit under
`conditioner.embedders.*` (`sdxl_keys.py`).

Everything here is key renaming plus one reshape (the VAE mid attention's 1x1 convs are linear
layers in diffusers). `convert_weights.tree` then maps the diffusers names onto our trees.
"""
from __future__ import annotations

import re

import numpy as np

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."

# ---------------------------------------------------------------- UNet
# Inside a ResNet block (LDM `ResBlock` sequential indices -> diffusers `ResnetBlock2D`).
_UNET_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."),
                ("emb_layers.1.", "time_emb_proj."), ("out_layers.0.", "norm2."),
                ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]
# Whole-model singletons.
_UNET_FIXED = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
               ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
               # SDXL's added (pooled text + time ids) embedding
               ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
_MID = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}


def _rename(rest: str, table, reverse=False) -> str:
  for a, b in table:
    if reverse:
      a, b = b, a
    if rest.startswith(a):
      return b + rest[len(a):]
  return rest


def unet_layers_per_block(ldm_keys) -> int:
  """LDM input block N = 1 + level*(L+1) + layer; the first downsampler sits at N = L+1."""
  ops = [int(m.group(1)) for k in ldm_keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))]
  if ops:
    return min(ops) - 1
  blocks = {int(m.group(1)) for k in ldm_keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
  return max(blocks)  # a single level without downsampler


def unet_key_ldm_to_diffusers(key: str, layers: int) -> str:
  """`input_blocks.4.1.proj_in.weight` -> `down_blocks.1.attentions.0.proj_in.weight` (L=2)."""
  fixed = _rename(key, _UNET_FIXED)
  if fixed != key:
    return fixed
  if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)$", key):
    n, sub, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
    i, j = divmod(n, layers + 1)
    if rest.startswith("op."):
      return f"down_blocks.{i}.downsamplers.0.conv.{rest[3:]}"
    if sub == "0":
      return f"down_blocks.{i}.resnets.{j}.{_rename(rest, _UNET_RESNET)}"
    return f"down_blocks.{i}.attentions.{j}.{rest}"
  if m := re.match(r"middle_block\.(\d)\.(.*)$", key):
    part, rest = _MID[m.group(1)], m.group(2)
    return f"mid_block.{part}.{_rename(rest, _UNET_RESNET) if 'resnets' in part else rest}"
  if m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)$", key):
    i, k = divmod(int(m.group(1)), layers + 1)
    sub, rest = m.group(2), m.group(3)
    if sub == "0":
      return f"up_blocks.{i}.resnets.{k}.{_rename(rest, _UNET_RESNET)}"
    if rest.startswith("conv."):  # Upsample: index 1 without attention, 2 with
      return f"up_blocks.{i}.upsamplers.0.{rest}"
    return f"up_blocks.{i}.attentions.{k}.{rest}"
  return key  # unknown: the caller reports it as unexpected


def unet_key_diffusers_to_ldm(key: str, layers: int, up_levels_with_attention: set[int]) -> str:
  fixed = _rename(key, _UNET_FIXED, reverse=True)
  if fixed != key:
    return fixed
  if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)$", key):
    i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
    if kind == "downsamplers":
      return f"input_blocks.{(i + 1) * (layers + 1)}.0.op.{rest[len('conv.'):]}"
    n = 1 + i * (layers + 1) + j
    if kind == "resnets":
      return f"input_blocks.{n}.0.{_rename(rest, _UNET_RESNET, reverse=True)}"
    return f"input_blocks.{n}.1.{rest}"
  if m := re.match(r"mid_block\.(resnets\.\d|attentions\.0)\.(.*)$", key):
    idx = {v: k for k, v in _MID.items()}[m.group(1)]
    rest = m.group(2)
    return f"middle_block.{idx}.{_rename(rest, _UNET_RESNET, reverse=True) if idx != '1' else rest}"
  if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)$", key):
    i, kind, k, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
    if kind == "upsamplers":
      sub = 2 if i in up_levels_with_attention else 1
      return f"output_blocks.{i * (layers + 1) + layers}.{sub}.{rest}"
    n = i * (layers + 1) + k
    if kind == "resnets":
      return f"output_blocks.{n}.0.{_rename(rest, _UNET_RESNET, reverse=True)}"
    return f"output_blocks.{n}.1.{rest}"
  return key


def unet_ldm_to_diffusers(sd: dict) -> dict:
  """UNet state dict without prefix, LDM -> diffusers names."""
  layers = unet_layers_per_block(sd)
  return {unet_key_ldm_to_diffusers(k, layers): v for k, v in sd.items()}


def unet_diffusers_to_ldm(sd: dict) -> dict:
  # up levels have L+1 resnets: the largest resnet index is L
  layers = max(int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.\d+\.resnets\.(\d+)\.", k)))
  attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
  return {unet_key_diffusers_to_ldm(k, layers, attn): v for k, v in sd.items()}


# ---------------------------------------------------------------- VAE
_VAE_FIXED = [("encoder.norm_out.", "encoder.conv_norm_out."), ("decoder.norm_out.", "decoder.conv_norm_out.")]
_VAE_MID = [("mid.block_1.", "mid_block.resnets.0."), ("mid.block_2.", "mid_block.resnets.1."),
            ("mid.attn_1.norm.", "mid_block.attentions.0.group_norm."),
            ("mid.attn_1.q.", "mid_block.attentions.0.to_q."),
            ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
            ("mid.attn_1.v.", "mid_block.attentions.0.to_v."),
            ("mid.attn_1.proj_out.", "mid_block.attentions.0.to_out.0.")]
_VAE_ATTN_LINEAR = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def vae_levels(keys) -> int:
  return 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"encoder\.down(?:_blocks)?\.(\d+)\.", k)))


def vae_key_ldm_to_diffusers(key: str, levels: int) -> str:
  key = key.replace(".nin_shortcut.", ".conv_shortcut.")
  fixed = _rename(key, _VAE_FIXED)
  if fixed != key:
    return fixed
  if m := re.match(r"(encoder|decoder)\.(mid\..*)$", key):
    return f"{m.group(1)}.{_rename(m.group(2), _VAE_MID)}"
  if m := re.match(r"encoder\.down\.(\d+)\.(block|downsample)\.(.*)$", key):
    i, kind, rest = m.groups()
    return (f"encoder.down_blocks.{i}.resnets.{rest}" if kind == "block"
            else f"encoder.down_blocks.{i}.downsamplers.0.{rest}")
  if m := re.match(r"decoder\.up\.(\d+)\.(block|upsample)\.(.*)$", key):
    b, kind, rest = m.groups()
    i = levels - 1 - int(b)  # LDM counts decoder levels from the bottom, diffusers from the top
    return (f"decoder.up_blocks.{i}.resnets.{rest}" if kind == "block"
            else f"decoder.up_blocks.{i}.upsamplers.0.{rest}")
  return key


def vae_key_diffusers_to_ldm(key: str, levels: int) -> str:
  key = key.replace(".conv_shortcut.", ".nin_shortcut.")
  fixed = _rename(key, _VAE_FIXED, reverse=True)
  if fixed != key:
    return fixed
  if m := re.match(r"(encoder|decoder)\.(mid_block\..*)$", key):
    return f"{m.group(1)}.{_rename(m.group(2), _VAE_MID, reverse=True)}"
  if m := re.match(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers\.0)\.(.*)$", key):
    i, kind, rest = m.groups()
    return f"encoder.down.{i}.{'block' if kind == 'resnets' else 'downsample'}.{rest}"
  if m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", key):
    i, kind, rest = m.groups()
    return f"decoder.up.{levels - 1 - int(i)}.{'block' if kind == 'resnets' else 'upsample'}.{rest}"
  return key


def vae_ldm_to_diffusers(sd: dict) -> dict:
  """VAE state dict without prefix, LDM -> diffusers; mid-attention 1x1 convs become linears."""
  levels = vae_levels(sd)
  out = {}
  for k, v in sd.items():
    nk = vae_key_ldm_to_diffusers(k, levels)
    if _VAE_ATTN_LINEAR.search(nk) and v.ndim == 4:
      v = v[:, :, 0, 0]  # (out, in, 1, 1) -> (out, in); a view, bit-exact
    out[nk] = v
  return out


def vae_diffusers_to_ldm(sd: dict) -> dict:
  levels = vae_levels(sd)
  out = {}
  for k, v in sd.items():
    if _VAE_ATTN_LINEAR.search(k) and v.ndim == 2:
      v = np.asarray(v)[:, :, None, None]  # LDM stores these as 1x1 convs
    out[vae_key_diffusers_to_ldm(k, levels)] = v
  return out


# ---------------------------------------------------------------- CLIP
def _text_model_prefix(k: str) -> str:
  return k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k


def clip_ldm_to_diffusers(sd: dict) -> dict:
  """`cond_stage_model.transformer.` contents -> transformers names (always with `text_model.`;
  files written with old transformers lack it; a CLIPTextModelWithProjection's
  `text_projection.weight` stays beside it)."""
  return {_text_model_prefix(k): v for k, v in sd.items()}


def clip_diffusers_to_ldm(sd: dict) -> dict:
  return {_text_model_prefix(k): v for k, v in sd.items()}


# ---------------------------------------------------------------- whole file
def split_ldm(sd: dict) -> tuple[dict, dict, dict, dict, list[str]]:
  """(unet, vae, clip, other, ema_keys): the three models without their prefixes, everything
  else (scheduler buffers such as `alphas_cumprod`), and the EMA keys (ignored)."""
  unet, vae, clip, other, ema = {}, {}, {}, {}, []
  for k, v in sd.items():
    if k.startswith(UNET_PREFIX):
      unet[k[len(UNET_PREFIX):]] = v
    elif k.startswith(VAE_PREFIX):
      vae[k[len(VAE_PREFIX):]] = v
    elif k.startswith(CLIP_PREFIX):
      clip[k[len(CLIP_PREFIX):]] = v
    elif k.startswith(EMA_PREFIX):
      ema.append(k)
    else:
      other[k] = v
  return unet, vae, clip, other, ema


def join_ldm(unet: dict, vae: dict, clip: dict, other: dict | None = None) -> dict:
  """Inverse of `split_ldm` for diffusers-named parts: a single-file LDM state dict."""
  out = {}
  out.update({UNET_PREFIX + k: v for k, v in unet_diffusers_to_ldm(unet).items()} if unet else {})
  out.update({VAE_PREFIX + k: v for k, v in vae_diffusers_to_ldm(vae).items()} if vae else {})
  out.update({CLIP_PREFIX + k: v for k, v in clip_diffusers_to_ldm(clip).items()} if clip else {})
  out.update(other or {})
  return out
