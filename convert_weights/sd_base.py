"""SD1.5 base model (UNet, VAE, CLIP text encoder): LDM single file or diffusers folder <-> our trees.

Config fields that the weights cannot tell (spatial attention heads, GroupNorm groups, CLIP
heads) default to SD1.5's (8, 32, hidden/64); pass configs to override or to validate against.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from adiff_jax.clip_text import CLIPTextConfig
from adiff_jax.model import param_shapes
from adiff_jax.motion_module import is_motion_module
from adiff_jax.unet import UNetConfig
from adiff_jax.vae import VAEConfig
from convert_weights import io, ldm
from convert_weights.errors import ConversionError
from convert_weights.tree import check_tree, state_dict_to_tree, tree_to_state_dict

CLIP_EMBEDDINGS = ("token_embedding", "position_embedding")
CLIP_BUFFERS = ("text_model.embeddings.position_ids",)  # recomputed; kept aside for exact export


# ---------------------------------------------------------------- refusing other families
def refuse_unsupported(keys, where: str) -> None:
  """SD2.x (OpenCLIP text encoder, 1024-dim context) and SDXL are recognised and refused."""
  keys = list(keys)
  if any(k.startswith("conditioner.embedders.") for k in keys) or any(
      k.startswith(ldm.UNET_PREFIX + "label_emb.") for k in keys):
    raise ConversionError(f"{where}: this is an SDXL checkpoint (conditioner.embedders / label_emb); "
                          "SDXL is not supported yet")
  if any(k.startswith("cond_stage_model.model.") for k in keys):
    raise ConversionError(f"{where}: this is an SD2.x checkpoint (OpenCLIP text encoder "
                          "cond_stage_model.model.*); SD2.x is not supported yet")


def _cross_dim_refusal(unet_cfg: UNetConfig, where: str) -> None:
  if unet_cfg.cross_attention_dim != 768 and unet_cfg.block_out_channels == (320, 640, 1280, 1280):
    family = "SD2.x" if unet_cfg.cross_attention_dim == 1024 else "this model family"
    raise ConversionError(f"{where}: UNet cross-attention width {unet_cfg.cross_attention_dim} "
                          f"(SD1.5 has 768): {family} is not supported yet")


# ---------------------------------------------------------------- config inference (diffusers names)
def _count(keys, pattern: str) -> int:
  return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def infer_unet_config(sd: dict, **overrides) -> UNetConfig:
  keys = list(sd)
  levels = _count(keys, r"down_blocks\.(\d+)\.")
  chans = tuple(int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels))
  cross = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(levels))
  k2 = [k for k in keys if k.endswith("attn2.to_k.weight")]
  depth = _count(keys, r"down_blocks\.\d+\.attentions\.0\.transformer_blocks\.(\d+)\.") or 1
  proj = next((sd[k] for k in keys if k.endswith("attentions.0.proj_in.weight")), None)
  out = sd["conv_out.weight"].shape[0] if "conv_out.weight" in sd else 4  # a ControlNet has none
  kw = dict(in_channels=int(sd["conv_in.weight"].shape[1]), out_channels=int(out),
            block_out_channels=chans, cross_attention_levels=cross,
            layers_per_block=_count(keys, r"down_blocks\.0\.resnets\.(\d+)\."),
            cross_attention_dim=int(sd[k2[0]].shape[1]) if k2 else 768, transformer_depth=depth,
            use_linear_projection=proj is not None and proj.ndim == 2)
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
  vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
  kw = dict(vocab_size=int(vocab), hidden_size=int(hidden),
            max_position_embeddings=int(sd["text_model.embeddings.position_embedding.weight"].shape[0]),
            intermediate_size=int(sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            num_layers=_count(sd, r"text_model\.encoder\.layers\.(\d+)\."), num_heads=max(1, int(hidden) // 64))
  kw.update(overrides)
  return CLIPTextConfig(**kw)


def text_config_from_transformers(cfg: dict, **overrides) -> CLIPTextConfig:
  kw = dict(vocab_size=cfg.get("vocab_size", 49408), hidden_size=cfg.get("hidden_size", 768),
            intermediate_size=cfg.get("intermediate_size", 3072), num_layers=cfg.get("num_hidden_layers", 12),
            num_heads=cfg.get("num_attention_heads", 12),
            max_position_embeddings=cfg.get("max_position_embeddings", 77),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), hidden_act=cfg.get("hidden_act", "quick_gelu"))
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


def text_tree(sd: dict, cfg: CLIPTextConfig, where: str) -> dict:
  tree = state_dict_to_tree(sd, embeddings=CLIP_EMBEDDINGS)
  check_tree(tree, param_shapes(cfg), f"{where} (text encoder)")
  return tree


def _pop_clip_buffers(sd: dict, extras: dict, prefix: str) -> dict:
  out = {}
  for k, v in sd.items():
    if k in CLIP_BUFFERS:
      extras[prefix + k] = v
    else:
      out[k] = v
  return out


def _from_ldm(path: str, sd: dict, unet_config, vae_config, text_config, notes, ov) -> dict:
  refuse_unsupported(sd, path)
  unet, vae, clip, other, ema = ldm.split_ldm(sd)
  if ema:
    notes.append(f"ignored {len(ema)} EMA tensors (model_ema.*); the non-EMA weights are used")
  if not unet:
    raise ConversionError(f"{path}: no UNet weights (model.diffusion_model.*) found")
  extras = dict(other)  # scheduler buffers etc.: kept only to write them back
  if other:
    notes.append(f"kept {len(other)} non-model tensors for export only: {', '.join(sorted(other)[:4])}")
  out = {"format": "ldm", "extras": extras}
  dunet = ldm.unet_ldm_to_diffusers(unet)
  cfg = unet_config or infer_unet_config(dunet, **ov.get("unet", {}))
  _cross_dim_refusal(cfg, path)
  out.update(unet=unet_tree(dunet, cfg, path), unet_config=cfg)
  if vae:
    dvae = ldm.vae_ldm_to_diffusers(vae)
    vcfg = vae_config or infer_vae_config(dvae, **ov.get("vae", {}))
    out.update(vae=vae_tree(dvae, vcfg, path), vae_config=vcfg)
  if clip:
    dclip = _pop_clip_buffers(ldm.clip_ldm_to_diffusers(clip), extras, ldm.CLIP_PREFIX)
    tcfg = text_config or infer_text_config(dclip, **ov.get("text_encoder", {}))
    out.update(text_encoder=text_tree(dclip, tcfg, path), text_config=tcfg)
  return out


def _from_diffusers(path: str, unet_config, vae_config, text_config, notes, progress, ov) -> dict:
  out = {"format": "diffusers", "extras": {}}
  udir = os.path.join(path, "unet")
  if os.path.isdir(udir):
    sd, cfg = io.load_diffusers_component(udir, progress=progress)
    if cfg.get("addition_embed_type") or any(k.startswith("add_embedding.") for k in sd):
      raise ConversionError(f"{path}: an SDXL-style UNet (add_embedding); SDXL is not supported yet")
    ucfg = unet_config or unet_config_from_diffusers(cfg, **ov.get("unet", {}))
    _cross_dim_refusal(ucfg, path)
    out.update(unet=unet_tree(sd, ucfg, udir), unet_config=ucfg)
  vdir = os.path.join(path, "vae")
  if os.path.isdir(vdir):
    sd, cfg = io.load_diffusers_component(vdir, progress=progress)
    vo = ov.get("vae", {})
    vcfg = vae_config or (vae_config_from_diffusers(cfg, **vo) if cfg else infer_vae_config(sd, **vo))
    out.update(vae=vae_tree(sd, vcfg, vdir), vae_config=vcfg)
  tdir = os.path.join(path, "text_encoder")
  if os.path.isdir(tdir):
    sd, cfg = io.load_diffusers_component(tdir, progress=progress)
    sd = _pop_clip_buffers(ldm.clip_ldm_to_diffusers(sd), out["extras"], "text_encoder.")
    if cfg.get("model_type") not in (None, "clip_text_model") or "text_model.encoder.layers.0.mlp.fc1.weight" not in sd:
      raise ConversionError(f"{tdir}: not a CLIP text model (model_type {cfg.get('model_type')!r})")
    to = ov.get("text_encoder", {})
    tcfg = text_config or (text_config_from_transformers(cfg, **to) if cfg else infer_text_config(sd, **to))
    out.update(text_encoder=text_tree(sd, tcfg, tdir), text_config=tcfg)
  if "unet" not in out:
    raise ConversionError(f"{path}: a diffusers folder without unet/")
  return out


def load_base_model(path: str, unet_config: Optional[UNetConfig] = None,
                    vae_config: Optional[VAEConfig] = None, text_config: Optional[CLIPTextConfig] = None,
                    info: Optional[dict] = None, progress: Optional[bool] = None,
                    overrides: Optional[dict] = None) -> dict:
  """An SD1.5 base model as our trees.

  overrides: {"unet"|"vae"|"text_encoder": {field: value}} applied to the inferred configs
  (heads, GroupNorm groups: what the weights cannot tell); full configs replace inference.

  Returns dict(unet, vae, text_encoder (the last two when present), unet_config, vae_config,
  text_config, format ("ldm" | "diffusers"), extras (non-parameter tensors kept only so an LDM
  export can write them back: `alphas_cumprod`, CLIP `position_ids`, ...), notes).
  """
  info = info if info is not None else {}
  notes = info.setdefault("notes", [])
  if io.is_diffusers_folder(path):
    out = _from_diffusers(path, unet_config, vae_config, text_config, notes, progress, overrides or {})
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
    out = _from_ldm(path, sd, unet_config, vae_config, text_config, notes, overrides or {})
  out["notes"] = notes
  return out


# ---------------------------------------------------------------- export
def base_to_ldm_state_dict(unet: Optional[dict] = None, vae: Optional[dict] = None,
                           text_encoder: Optional[dict] = None, extras: Optional[dict] = None) -> dict:
  """Our trees -> one LDM single-file state dict (numpy); extras (from loading) are written back."""
  extras = dict(extras or {})
  clip = tree_to_state_dict(text_encoder) if text_encoder is not None else {}
  for k in CLIP_BUFFERS:  # buffers taken out of a diffusers folder go back under the LDM prefix
    if "text_encoder." + k in extras:
      extras[ldm.CLIP_PREFIX + k] = extras.pop("text_encoder." + k)
  return ldm.join_ldm(tree_to_state_dict(unet) if unet is not None else {},
                      tree_to_state_dict(vae) if vae is not None else {}, clip, extras)


def export_ldm(path: str, unet: Optional[dict] = None, vae: Optional[dict] = None,
               text_encoder: Optional[dict] = None, extras: Optional[dict] = None) -> None:
  """Write a single-file LDM checkpoint (`.safetensors` or `.ckpt`) that A1111 / ComfyUI /
  diffusers' `from_single_file` read. The UNet tree must not contain motion modules."""
  if unet is not None and any(is_motion_module(k) for k in _flat_keys(unet)):
    raise ConversionError("export_ldm: the UNet tree contains motion modules; export them separately")
  io.save_torch_file(base_to_ldm_state_dict(unet, vae, text_encoder, extras), path)


def _flat_keys(tree):
  from adiff_jax.params import flatten
  return flatten(tree).keys()


def tree_from_diffusers(sd: dict, kind: str) -> dict:
  """A diffusers / transformers state dict (torch tensors or numpy) -> our tree, without config
  checks. kind: "unet" | "vae" | "text_encoder" (with or without the `text_model.` prefix;
  the `position_ids` buffer is dropped). Handy for tests that build references in PyTorch."""
  sd = {k: (io.tensor_to_numpy(v) if hasattr(v, "detach") else np.asarray(v)) for k, v in sd.items()}
  if kind == "text_encoder":
    sd = _pop_clip_buffers(ldm.clip_ldm_to_diffusers(sd), {}, "")
    return state_dict_to_tree(sd, embeddings=CLIP_EMBEDDINGS)
  if kind not in ("unet", "vae"):
    raise ValueError(f"unknown kind {kind!r}")
  return state_dict_to_tree(sd)
