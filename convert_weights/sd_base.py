"""SD1.5 and SDXL base models (UNet, VAE, CLIP text encoder(s)): LDM single file or diffusers
folder <-> our trees.

SDXL base: the same UNet/VAE names plus the UNet's added embedding (`label_emb` / `add_embedding`),
CLIP-L as `text_encoder` and OpenCLIP bigG (with projection) as `text_encoder_2`
(`sdxl_keys.py` for the single-file names). SD2.x and the SDXL refiner are refused.

Config fields that the weights cannot tell (spatial attention heads, GroupNorm groups, CLIP
heads) default to SD1.5's (8, 32, hidden/64), or SDXL's (channels/64 heads, time ids embedded
with (label_emb width - pooled width) / 6 channels, OpenCLIP's exact GELU, VAE scaling 0.13025);
pass configs to override or to validate against.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from adiff_jax.clip_text import CLIPTextConfig
from adiff_jax.errors import InputError
from adiff_jax.model import ModelConfig, param_shapes
from adiff_jax.motion_module import is_motion_module
from adiff_jax.unet import UNetConfig
from adiff_jax.vae import VAEConfig
from convert_weights import io, ldm, sdxl_keys
from convert_weights.errors import ConversionError
from convert_weights.tree import check_tree, state_dict_to_tree, tree_to_state_dict

CLIP_EMBEDDINGS = ("token_embedding", "position_embedding")
CLIP_BUFFERS = ("text_model.embeddings.position_ids",)  # recomputed; kept aside for exact export


# ---------------------------------------------------------------- refusing other families
REFINER_MESSAGE = ("this is an SDXL refiner (a single OpenCLIP text encoder, 2560-wide label_emb: pooled "
                   "text + 5 time ids with the aesthetic score, 1280-wide context); only the SDXL base "
                   "model is supported (the AnimateDiff SDXL motion module is made for the base)")


def refuse_unsupported(keys, where: str) -> None:
  """SD2.x (OpenCLIP text encoder, 1024-dim context) and the SDXL refiner are recognised and refused."""
  keys = list(keys)
  if sdxl_keys.is_refiner(keys):
    raise ConversionError(f"{where}: {REFINER_MESSAGE} (conditioner.embedders.0.model.*)")
  if any(k.startswith("cond_stage_model.model.") for k in keys):
    raise ConversionError(f"{where}: this is an SD2.x checkpoint (OpenCLIP text encoder "
                          "cond_stage_model.model.*); SD2.x is not supported yet")


def is_refiner_unet(cfg: UNetConfig) -> bool:
  """The refiner's added embedding: pooled text as wide as the context and 5 time ids (SDXL base:
  pooled 1280 beside a 2048 context, 6 time ids)."""
  return bool(cfg.addition_embed_type) and (cfg.projection_class_embeddings_input_dim - cfg.cross_attention_dim
                                            == 5 * cfg.addition_time_embed_dim)


def _cross_dim_refusal(unet_cfg: UNetConfig, where: str) -> None:
  if is_refiner_unet(unet_cfg):
    raise ConversionError(f"{where}: {REFINER_MESSAGE}")
  if unet_cfg.cross_attention_dim != 768 and unet_cfg.block_out_channels == (320, 640, 1280, 1280):
    family = "SD2.x" if unet_cfg.cross_attention_dim == 1024 else "this model family"
    raise ConversionError(f"{where}: UNet cross-attention width {unet_cfg.cross_attention_dim} "
                          f"(SD1.5 has 768): {family} is not supported yet")


# ---------------------------------------------------------------- config inference (diffusers names)
def _count(keys, pattern: str) -> int:
  return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def infer_unet_config(sd: dict, pooled_dim: Optional[int] = None, **overrides) -> UNetConfig:
  """UNetConfig from diffusers-named weights. An SDXL-style UNet (`add_embedding.*`) gets SDXL's
  defaults for what the weights cannot tell: heads = channels / 64, and time ids embedded with
  (its input width - pooled_dim) / 6 channels (pooled_dim: the second text encoder's projection;
  unknown: 256, SDXL's)."""
  keys = list(sd)
  levels = _count(keys, r"down_blocks\.(\d+)\.")
  chans = tuple(int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels))
  cross = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(levels))
  k2 = [k for k in keys if k.endswith("attn2.to_k.weight")]
  # transformer blocks per level (SDXL: 1, 2, 10); one int when every level with attention agrees
  depths = [max(1, _count(keys, rf"down_blocks\.{i}\.attentions\.\d+\.transformer_blocks\.(\d+)\."))
            for i in range(levels)]
  with_attn = {d for d, c in zip(depths, cross) if c}
  depth = (with_attn.pop() if len(with_attn) == 1 else tuple(d if c else 1 for d, c in zip(depths, cross))
           if with_attn else 1)
  proj = next((sd[k] for k in keys if k.endswith("attentions.0.proj_in.weight")), None)
  out = sd["conv_out.weight"].shape[0] if "conv_out.weight" in sd else 4  # a ControlNet has none
  kw = dict(in_channels=int(sd["conv_in.weight"].shape[1]), out_channels=int(out),
            block_out_channels=chans, cross_attention_levels=cross,
            layers_per_block=_count(keys, r"down_blocks\.0\.resnets\.(\d+)\."),
            cross_attention_dim=int(sd[k2[0]].shape[1]) if k2 else 768, transformer_depth=depth,
            use_linear_projection=proj is not None and proj.ndim == 2)
  if "add_embedding.linear_1.weight" in sd:  # SDXL's text_time embedding
    width = int(sd["add_embedding.linear_1.weight"].shape[1])
    time_dim = (width - pooled_dim) // 6 if pooled_dim and width > pooled_dim and (width - pooled_dim) % 6 == 0 else 256
    kw.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=width,
              addition_time_embed_dim=time_dim, attention_heads=tuple(max(1, c // 64) for c in chans))
  kw.update(overrides)
  return UNetConfig(**kw)


def unet_config_from_diffusers(cfg: dict, **overrides) -> UNetConfig:
  heads = cfg.get("attention_head_dim", 8)  # diffusers' SD1.x name for the head count
  kw = dict(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
            block_out_channels=tuple(cfg["block_out_channels"]),
            cross_attention_levels=tuple("CrossAttn" in t for t in cfg["down_block_types"]),
            layers_per_block=cfg.get("layers_per_block", 2),
            attention_heads=tuple(heads) if isinstance(heads, list) else heads,
            cross_attention_dim=cfg.get("cross_attention_dim", 768),
            norm_num_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
            use_linear_projection=cfg.get("use_linear_projection", False),
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0))
  depth = cfg.get("transformer_layers_per_block", 1)   # SDXL: one per level
  kw["transformer_depth"] = tuple(depth) if isinstance(depth, (list, tuple)) else depth
  if cfg.get("addition_embed_type"):                    # SDXL "text_time" (others refused by UNetConfig)
    kw.update(addition_embed_type=cfg["addition_embed_type"],
              addition_time_embed_dim=cfg.get("addition_time_embed_dim") or 256,
              projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim") or 2816)
  kw.update(overrides)
  return UNetConfig(**kw)


def infer_vae_config(sd: dict, **overrides) -> VAEConfig:
  keys = list(sd)
  levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
  kw = dict(in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
            out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
            latent_channels=int(sd["post_quant_conv.weight"].shape[0]),
            block_out_channels=tuple(int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                                     for i in range(levels)),
            layers_per_block=_count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
  kw.update(overrides)
  return VAEConfig(**kw)


def vae_config_from_diffusers(cfg: dict, **overrides) -> VAEConfig:
  kw = dict(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 4), block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=cfg.get("layers_per_block", 2), norm_num_groups=cfg.get("norm_num_groups", 32),
            scaling_factor=cfg.get("scaling_factor", 0.18215))
  kw.update(overrides)
  return VAEConfig(**kw)


def infer_text_config(sd: dict, **overrides) -> CLIPTextConfig:
  """CLIPTextConfig from transformers-named weights; `text_projection.weight` gives projection_dim.
  hidden_act cannot be told: quick_gelu (OpenAI CLIP) unless overridden ("gelu" for OpenCLIP)."""
  vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
  kw = dict(vocab_size=int(vocab), hidden_size=int(hidden),
            max_position_embeddings=int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
            intermediate_size=int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            num_layers=_count(sd, r"text_model\.encoder\.layers\.(\d+)\."), num_heads=max(1, int(hidden) // 64))
  if "text_projection.weight" in sd:
    kw["projection_dim"] = int(sd["text_projection.weight"].shape[0])
  kw.update(overrides)
  return CLIPTextConfig(**kw)


def text_config_from_transformers(cfg: dict, with_projection: bool = False, **overrides) -> CLIPTextConfig:
  """with_projection: the weights have `text_projection` (CLIPTextModelWithProjection); SDXL's
  first encoder's config names a projection_dim too, but that model has none."""
  kw = dict(vocab_size=cfg.get("vocab_size", 49408), hidden_size=cfg.get("hidden_size", 768),
            intermediate_size=cfg.get("intermediate_size", 3072), num_layers=cfg.get("num_hidden_layers", 12),
            num_heads=cfg.get("num_attention_heads", 12),
            max_position_embeddings=cfg.get("max_position_embeddings", 77),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), hidden_act=cfg.get("hidden_act", "quick_gelu"))
  if with_projection:
    kw["projection_dim"] = cfg.get("projection_dim", 512)
  kw.update(overrides)
  return CLIPTextConfig(**kw)


# ---------------------------------------------------------------- diffusers-named state dicts <-> trees
def unet_tree(sd: dict, cfg: UNetConfig, where: str) -> dict:
  tree = state_dict_to_tree(sd)
  check_tree(tree, param_shapes(cfg), f"{where} (UNet)")
  return tree


def vae_tree(sd: dict, cfg: VAEConfig, where: str) -> dict:
  tree = state_dict_to_tree(sd)
  check_tree(tree, param_shapes(cfg), f"{where} (VAE)")
  return tree


def text_tree(sd: dict, cfg: CLIPTextConfig, where: str, what: str = "text encoder") -> dict:
  tree = state_dict_to_tree(sd, embeddings=CLIP_EMBEDDINGS)
  check_tree(tree, param_shapes(cfg), f"{where} ({what})")
  return tree


def _pop_clip_buffers(sd: dict, extras: dict, prefix: str) -> dict:
  out = {}
  for k, v in sd.items():
    if k in CLIP_BUFFERS:
      extras[prefix + k] = v
    else:
      out[k] = v
  return out


def _check_sdxl(out: dict, where: str) -> None:
  """SDXL parts fit together: text widths sum to the UNet's context, the projection is its pooled text."""
  if {"unet_config", "text_config", "text_config_2"} <= set(out):
    try:
      ModelConfig(out["unet_config"], None, out["text_config"], out.get("vae_config") or VAEConfig.sdxl(),
                  out["text_config_2"])
    except InputError as e:
      raise ConversionError(f"{where}: the SDXL parts do not fit together: {e}") from None


def _from_ldm(path: str, sd: dict, unet_config, vae_config, text_config, text_config_2, notes, ov) -> dict:
  refuse_unsupported(sd, path)
  sdxl = sdxl_keys.is_sdxl(sd)
  if sdxl:
    unet, vae, clip, clip_g, other, ema = sdxl_keys.split_sdxl(sd)
  else:
    (unet, vae, clip, other, ema), clip_g = ldm.split_ldm(sd), {}
  if ema:
    notes.append(f"ignored {len(ema)} EMA tensors (model_ema.*); the non-EMA weights are used")
  if not unet:
    raise ConversionError(f"{path}: no UNet weights (model.diffusion_model.*) found")
  if not any(k.startswith("input_blocks.") for k in unet):
    raise ConversionError(f"{path}: the UNet (model.diffusion_model.*) has no input_blocks: an "
                          "incomplete file or not an SD UNet")
  extras = dict(other)  # scheduler buffers etc.: kept only to write them back
  if other:
    notes.append(f"kept {len(other)} non-model tensors for export only: {', '.join(sorted(other)[:4])}")
  out = {"format": "ldm", "family": "sdxl" if sdxl else "sd15", "extras": extras}
  if clip_g:  # first: its projection width tells the UNet's time-id embedding width
    dg, g_extras = sdxl_keys.open_clip_to_transformers(clip_g)
    extras.update({sdxl_keys.CLIP_G_PREFIX + k: v for k, v in g_extras.items()})
    tcfg2 = text_config_2 or infer_text_config(dg, **{"hidden_act": "gelu", **ov.get("text_encoder_2", {})})
    out.update(text_encoder_2=text_tree(dg, tcfg2, path, "text encoder 2"), text_config_2=tcfg2)
  dunet = ldm.unet_ldm_to_diffusers(unet)
  pooled = out["text_config_2"].projection_dim if "text_config_2" in out else None
  cfg = unet_config or infer_unet_config(dunet, pooled, **ov.get("unet", {}))
  _cross_dim_refusal(cfg, path)
  out.update(unet=unet_tree(dunet, cfg, path), unet_config=cfg)
  if vae:
    dvae = ldm.vae_ldm_to_diffusers(vae)
    vo = {**({"scaling_factor": VAEConfig.sdxl().scaling_factor} if sdxl else {}), **ov.get("vae", {})}
    vcfg = vae_config or infer_vae_config(dvae, **vo)
    out.update(vae=vae_tree(dvae, vcfg, path), vae_config=vcfg)
  if clip:
    prefix = sdxl_keys.CLIP_L_PREFIX if sdxl else ldm.CLIP_PREFIX
    dclip = _pop_clip_buffers(ldm.clip_ldm_to_diffusers(clip), extras, prefix)
    tcfg = text_config or infer_text_config(dclip, **ov.get("text_encoder", {}))
    out.update(text_encoder=text_tree(dclip, tcfg, path), text_config=tcfg)
  if sdxl:
    _check_sdxl(out, path)
  return out


def _text_component(tdir: str, cfg_override, overrides: dict, extras: dict, name: str, progress) -> tuple:
  """A transformers CLIP text model folder -> (tree, config); with_projection from the weights."""
  sd, cfg = io.load_diffusers_component(tdir, progress=progress)
  sd = _pop_clip_buffers(ldm.clip_ldm_to_diffusers(sd), extras, name + ".")
  if cfg.get("model_type") not in (None, "clip_text_model") or "text_model.encoder.layers.0.mlp.fc1.weight" not in sd:
    raise ConversionError(f"{tdir}: not a CLIP text model (model_type {cfg.get('model_type')!r})")
  proj = "text_projection.weight" in sd
  if name == "text_encoder_2" and not proj:
    raise ConversionError(f"{tdir}: SDXL's text_encoder_2 needs text_projection.weight "
                          "(a CLIPTextModelWithProjection)")
  tcfg = cfg_override or (text_config_from_transformers(cfg, proj, **overrides) if cfg
                          else infer_text_config(sd, **overrides))
  return text_tree(sd, tcfg, tdir, name.replace("_", " ")), tcfg


def _from_diffusers(path: str, unet_config, vae_config, text_config, text_config_2, notes, progress, ov) -> dict:
  out = {"format": "diffusers", "family": "sd15", "extras": {}}
  tdir, tdir2 = os.path.join(path, "text_encoder"), os.path.join(path, "text_encoder_2")
  if os.path.isdir(tdir2) and not os.path.isdir(tdir):
    raise ConversionError(f"{path}: {REFINER_MESSAGE} (text_encoder_2/ without text_encoder/)")
  if os.path.isdir(tdir2):
    tree, tcfg2 = _text_component(tdir2, text_config_2, ov.get("text_encoder_2", {}), out["extras"],
                                  "text_encoder_2", progress)
    out.update(text_encoder_2=tree, text_config_2=tcfg2, family="sdxl")
  udir = os.path.join(path, "unet")
  if os.path.isdir(udir):
    sd, cfg = io.load_diffusers_component(udir, progress=progress)
    ucfg = unet_config or unet_config_from_diffusers(cfg, **ov.get("unet", {}))
    _cross_dim_refusal(ucfg, path)
    if ucfg.addition_embed_type:
      out["family"] = "sdxl"
    out.update(unet=unet_tree(sd, ucfg, udir), unet_config=ucfg)
  vdir = os.path.join(path, "vae")
  if os.path.isdir(vdir):
    sd, cfg = io.load_diffusers_component(vdir, progress=progress)
    vo = ov.get("vae", {})
    vcfg = vae_config or (vae_config_from_diffusers(cfg, **vo) if cfg else infer_vae_config(sd, **vo))
    out.update(vae=vae_tree(sd, vcfg, vdir), vae_config=vcfg)
  if os.path.isdir(tdir):
    tree, tcfg = _text_component(tdir, text_config, ov.get("text_encoder", {}), out["extras"],
                                 "text_encoder", progress)
    out.update(text_encoder=tree, text_config=tcfg)
  if "unet" not in out:
    raise ConversionError(f"{path}: a diffusers folder without unet/")
  if out["family"] == "sdxl":
    _check_sdxl(out, path)
  return out


def load_base_model(path: str, unet_config: Optional[UNetConfig] = None,
                    vae_config: Optional[VAEConfig] = None, text_config: Optional[CLIPTextConfig] = None,
                    info: Optional[dict] = None, progress: Optional[bool] = None,
                    overrides: Optional[dict] = None,
                    text_config_2: Optional[CLIPTextConfig] = None) -> dict:
  """An SD1.5 or SDXL base model as our trees.

  overrides: {"unet"|"vae"|"text_encoder"|"text_encoder_2": {field: value}} applied to the
  inferred configs (heads, GroupNorm groups: what the weights cannot tell); full configs replace
  inference.

  Returns dict(unet, vae, text_encoder, text_encoder_2 (those present; text_encoder_2: SDXL),
  unet_config, vae_config, text_config, text_config_2, format ("ldm" | "diffusers"), family
  ("sd15" | "sdxl"), extras (non-parameter tensors kept only so an export can write them back:
  `alphas_cumprod`, CLIP `position_ids`, OpenCLIP `logit_scale`, ...), notes).
  """
  info = info if info is not None else {}
  notes = info.setdefault("notes", [])
  ov = overrides or {}
  if io.is_diffusers_folder(path):
    out = _from_diffusers(path, unet_config, vae_config, text_config, text_config_2, notes, progress, ov)
  elif os.path.isdir(path):
    raise ConversionError(f"{path}: a folder without unet/, vae/ or text_encoder/ config.json: "
                          "not a diffusers model folder")
  else:
    sd = io.load_torch_file(path, info, progress)
    if not any(k.startswith(ldm.UNET_PREFIX) for k in sd):
      refuse_unsupported(sd, path)
      from convert_weights.detect import detect_keys
      raise ConversionError(f"{path}: not an LDM single-file SD checkpoint (no model.diffusion_model.* "
                            f"keys); it looks like: {detect_keys(sd)}")
    out = _from_ldm(path, sd, unet_config, vae_config, text_config, text_config_2, notes, ov)
  out["notes"] = notes
  return out


# ---------------------------------------------------------------- export
def _is_sdxl_export(unet, text_encoder_2, extras) -> bool:
  return (text_encoder_2 is not None or (unet is not None and "add_embedding" in unet)
          or any(k.startswith("conditioner.") for k in extras))


def base_to_ldm_state_dict(unet: Optional[dict] = None, vae: Optional[dict] = None,
                           text_encoder: Optional[dict] = None, extras: Optional[dict] = None,
                           text_encoder_2: Optional[dict] = None) -> dict:
  """Our trees -> one LDM single-file state dict (numpy); extras (from loading) are written back.
  SDXL (a text_encoder_2, or an SDXL UNet): the SDXL single-file layout (`sdxl_keys`)."""
  extras = dict(extras or {})
  clip = tree_to_state_dict(text_encoder) if text_encoder is not None else {}
  unet_sd = tree_to_state_dict(unet) if unet is not None else {}
  vae_sd = tree_to_state_dict(vae) if vae is not None else {}
  if _is_sdxl_export(unet, text_encoder_2, extras):
    for k in CLIP_BUFFERS:  # buffers of a diffusers folder: CLIP-L's go under its LDM prefix,
      if "text_encoder." + k in extras:  # OpenCLIP has none
        extras[sdxl_keys.CLIP_L_PREFIX + k] = extras.pop("text_encoder." + k)
      extras.pop("text_encoder_2." + k, None)
    clip_g = tree_to_state_dict(text_encoder_2) if text_encoder_2 is not None else {}
    return sdxl_keys.join_sdxl(unet_sd, vae_sd, clip, clip_g, extras)
  for k in CLIP_BUFFERS:  # buffers taken out of a diffusers folder go back under the LDM prefix
    if "text_encoder." + k in extras:
      extras[ldm.CLIP_PREFIX + k] = extras.pop("text_encoder." + k)
  return ldm.join_ldm(unet_sd, vae_sd, clip, extras)


def _no_motion_modules(unet, what: str) -> None:
  if unet is not None and any(is_motion_module(k) for k in _flat_keys(unet)):
    raise ConversionError(f"{what}: the UNet tree contains motion modules; export them separately")


def export_ldm(path: str, unet: Optional[dict] = None, vae: Optional[dict] = None,
               text_encoder: Optional[dict] = None, extras: Optional[dict] = None,
               text_encoder_2: Optional[dict] = None) -> None:
  """Write a single-file LDM checkpoint (`.safetensors` or `.ckpt`) that A1111 / ComfyUI /
  diffusers' `from_single_file` read: SD1.x layout, or SDXL's with a text_encoder_2 / SDXL UNet.
  The UNet tree must not contain motion modules."""
  _no_motion_modules(unet, "export_ldm")
  io.save_torch_file(base_to_ldm_state_dict(unet, vae, text_encoder, extras, text_encoder_2), path)


# diffusers / transformers config.json of our configs (what `*_config_from_*` read back)
def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
  lst = lambda v: list(v) if isinstance(v, tuple) else v
  out = {"_class_name": "UNet2DConditionModel", "in_channels": cfg.in_channels,
         "out_channels": cfg.out_channels, "block_out_channels": list(cfg.block_out_channels),
         "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cfg.cross_attention_levels],
         "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cfg.cross_attention_levels)],
         "layers_per_block": cfg.layers_per_block, "attention_head_dim": lst(cfg.attention_heads),
         "cross_attention_dim": cfg.cross_attention_dim, "norm_num_groups": cfg.norm_num_groups,
         "norm_eps": cfg.norm_eps, "transformer_layers_per_block": lst(cfg.transformer_depth),
         "use_linear_projection": cfg.use_linear_projection, "flip_sin_to_cos": cfg.flip_sin_to_cos,
         "freq_shift": cfg.freq_shift}
  if cfg.addition_embed_type:
    out.update(addition_embed_type=cfg.addition_embed_type, addition_time_embed_dim=cfg.addition_time_embed_dim,
               projection_class_embeddings_input_dim=cfg.projection_class_embeddings_input_dim)
  return out


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
  n = len(cfg.block_out_channels)
  return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
          "latent_channels": cfg.latent_channels, "block_out_channels": list(cfg.block_out_channels),
          "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
          "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_num_groups,
          "scaling_factor": cfg.scaling_factor}


def text_config_to_transformers(cfg: CLIPTextConfig) -> dict:
  """transformers CLIPTextConfig fields; eos_token_id 2 as SD's and SDXL's own configs (transformers
  then pools at argmax(ids), as `CLIPTextModel` does)."""
  out = {"architectures": ["CLIPTextModelWithProjection" if cfg.projection_dim else "CLIPTextModel"],
         "model_type": "clip_text_model", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
         "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
         "num_attention_heads": cfg.num_heads, "max_position_embeddings": cfg.max_position_embeddings,
         "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": cfg.hidden_act,
         "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
  if cfg.projection_dim:
    out["projection_dim"] = cfg.projection_dim
  return out


DIFFUSERS_WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                     "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


def export_diffusers(out_dir: str, parts: dict, configs: dict, extras: Optional[dict] = None,
                     tokenizers: bool = True) -> None:
  """Write a diffusers model folder: `<part>/config.json` + weights for each of parts ({"unet",
  "vae", "text_encoder", "text_encoder_2"}: our trees; configs: their UNetConfig / VAEConfig /
  CLIPTextConfig), text encoders with the hub's names (`text_model.*`, `text_projection.weight`),
  and tokenizer/ (+ tokenizer_2/ with "!" padding for SDXL) from the built-in vocabulary.
  extras "<part>.<key>" (buffers a diffusers folder had) go back into that part's file. Written
  to a temporary folder and renamed: a failure leaves nothing."""
  import shutil
  from adiff_jax.tokenizer import CLIPTokenizer
  _no_motion_modules(parts.get("unet"), "export_diffusers")
  unknown = set(parts) - set(DIFFUSERS_WEIGHTS)
  if unknown:
    raise ConversionError(f"export_diffusers: unknown parts {sorted(unknown)}")
  to_json = {"unet": unet_config_to_diffusers, "vae": vae_config_to_diffusers,
             "text_encoder": text_config_to_transformers, "text_encoder_2": text_config_to_transformers}
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise ConversionError(f"{out_dir}: already exists")
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    for part, tree in parts.items():
      sd = tree_to_state_dict(tree)
      sd.update({k[len(part) + 1:]: v for k, v in (extras or {}).items() if k.startswith(part + ".")})
      io.write_diffusers_component(os.path.join(tmp, part), sd, to_json[part](configs[part]),
                                   DIFFUSERS_WEIGHTS[part], metadata={"format": "pt"})
    if tokenizers and "text_encoder" in parts:
      CLIPTokenizer.default().save_pretrained(os.path.join(tmp, "tokenizer"))
    if tokenizers and "text_encoder_2" in parts:
      CLIPTokenizer.default(pad="!").save_pretrained(os.path.join(tmp, "tokenizer_2"))
    os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _flat_keys(tree):
  from adiff_jax.params import flatten
  return flatten(tree).keys()


def tree_from_diffusers(sd: dict, kind: str) -> dict:
  """A diffusers / transformers state dict (torch tensors or numpy) -> our tree, without config
  checks. kind: "unet" | "vae" | "text_encoder" | "text_encoder_2" (transformers names, with or
  without the `text_model.` prefix; the `position_ids` buffer is dropped) | "open_clip" (SDXL
  single-file OpenCLIP names, `conditioner.embedders.1.model.` removed). Handy for tests that
  build references in PyTorch."""
  sd = {k: (io.tensor_to_numpy(v) if hasattr(v, "detach") else np.asarray(v)) for k, v in sd.items()}
  if kind == "open_clip":
    sd, kind = sdxl_keys.open_clip_to_transformers(sd)[0], "text_encoder_2"
  if kind in ("text_encoder", "text_encoder_2"):
    sd = _pop_clip_buffers(ldm.clip_ldm_to_diffusers(sd), {}, "")
    return state_dict_to_tree(sd, embeddings=CLIP_EMBEDDINGS)
  if kind not in ("unet", "vae"):
    raise ValueError(f"unknown kind {kind!r}")
  return state_dict_to_tree(sd)
