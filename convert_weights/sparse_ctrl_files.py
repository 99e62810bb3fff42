"""SparseCtrl files (official `.ckpt` / `.safetensors`, diffusers `SparseControlNetModel` folder
or file) <-> our `adiff_jax.sparse_ctrl.SparseControlNet` tree. Names: `sparse_ctrl_keys`.

What the weights cannot tell comes from a diffusers `config.json`, an `animatediff_config`, or
the official defaults: spatial attention heads 8, GroupNorm groups 32, motion heads 8; the
positional-encoding length from the stored `pe` buffers (else 32). `overrides` set them:
{"unet": {field: value}, "sparse_ctrl": {field: value}, "motion": {field: value}}.
The `pe` buffers are kept aside (info["extras"]) so an export to the same format is bit-exact.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import numpy as np

from adiff_jax.sparse_ctrl import SparseCtrlConfig, param_shapes
from adiff_jax.unet import UNetConfig
from convert_weights import io
from convert_weights import sparse_ctrl_keys as keys
from convert_weights.detect import detect_keys
from convert_weights.errors import ConversionError, few
from convert_weights.motion_module_files import _find, _torch_pe
from convert_weights.sd_base import infer_unet_config, unet_config_from_diffusers
from convert_weights.tree import check_tree, state_dict_to_tree, tree_to_state_dict

FORMATS = ("original", "diffusers")


def _count(names, pattern: str) -> int:
  return len({m.group(1) for k in names if (m := re.match(pattern, k))})


def infer_configs(sd: dict, diffusers_cfg: Optional[dict] = None, animatediff_cfg=None,
                  overrides: Optional[dict] = None) -> tuple[SparseCtrlConfig, UNetConfig]:
  """(SparseCtrlConfig, UNetConfig) of an official-named state dict (pe buffers included)."""
  dc, ov = diffusers_cfg or {}, overrides or {}
  if dc.get("block_out_channels"):
    unet = unet_config_from_diffusers(dc, **ov.get("unet", {}))
  else:
    unet = infer_unet_config(sd, **ov.get("unet", {}))
  simplified = keys.RGB_KEY in sd
  first = sd[keys.RGB_KEY if simplified else keys.SCRIBBLE_KEY]
  mask = dc.get("concat_conditioning_mask", True)
  emb = ()
  if not simplified:
    n = _count(sd, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    emb = (int(first.shape[0]),) + tuple(int(sd[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"].shape[0])
                                         for i in range(n // 2))
  mm_keys = [k for k in sd if "motion_modules." in k]
  pe_lens = {int(sd[k].shape[1]) for k in mm_keys if keys.is_pe_buffer(k)}
  if len(pe_lens) > 1:
    raise ConversionError(f"pe buffers of different lengths {sorted(pe_lens)}")
  max_len = next(iter(pe_lens), None) or dc.get("motion_max_seq_length") or _find(
      animatediff_cfg, "temporal_position_encoding_max_len") or 32
  heads = dc.get("motion_num_attention_heads") or _find(animatediff_cfg, "num_attention_heads") or 8
  levels = sorted({int(m.group(1)) for k in mm_keys if (m := re.match(r"down_blocks\.(\d+)\.", k))})
  motion = dict(
      num_heads=int(heads), max_len=int(max_len),
      num_transformer_blocks=_count(mm_keys, r".*temporal_transformer\.transformer_blocks\.(\d+)\.") or 1,
      num_attention_blocks=_count(mm_keys, r".*transformer_blocks\.0\.attention_blocks\.(\d+)\.to_q\.") or 1,
      # diffusers builds these GroupNorms with the UNet's groups; the official code with 32
      norm_groups=int(dc.get("norm_num_groups", 32)),
      mid_block=any(k.startswith("mid_block.motion_modules.") for k in mm_keys))
  base = SparseCtrlConfig.rgb() if simplified else SparseCtrlConfig.scribble()
  if levels != list(range(len(unet.block_out_channels))):   # all levels: the official default
    motion["resolutions"] = tuple(2 ** i for i in levels)
  motion.update(ov.get("motion", {}))
  kw = dict(conditioning_channels=int(first.shape[1]) - int(bool(mask)),
            use_simplified_condition_embedding=simplified, concat_conditioning_mask=bool(mask),
            motion=dataclasses.replace(base.motion, **motion))
  if emb:
    kw["conditioning_embedding_channels"] = emb
  kw.update(ov.get("sparse_ctrl", {}))
  return dataclasses.replace(base, **kw), unet


def tree_from_state_dict(sd: dict, where: str = "state dict", diffusers_cfg: Optional[dict] = None,
                         animatediff_cfg=None, overrides: Optional[dict] = None,
                         info: Optional[dict] = None) -> tuple[dict, SparseCtrlConfig, UNetConfig]:
  """A SparseCtrl state dict in either format (torch tensors or numpy) -> (tree, config, UNet config).
  info receives `format` ("original" | "diffusers"), `extras` (the pe buffers by their keys), `notes`."""
  info = info if info is not None else {}
  info.setdefault("notes", [])
  sd = {k: (io.tensor_to_numpy(v) if hasattr(v, "detach") else np.asarray(v)) for k, v in sd.items()}
  fmt = detect_keys(sd)
  if fmt not in ("sparse_ctrl_original", "sparse_ctrl_diffusers"):
    raise ConversionError(f"{where}: not a SparseCtrl model: found {fmt} (keys such as {few(list(sd)[:3], 3)})")
  info["format"] = "original" if fmt == "sparse_ctrl_original" else "diffusers"
  if info["format"] == "diffusers":
    sd = {keys.diffusers_to_official(k): v for k, v in sd.items()}
  config, unet = infer_configs(sd, diffusers_cfg, animatediff_cfg, overrides)
  info["extras"] = {k: v for k, v in sd.items() if keys.is_pe_buffer(k)}
  tree = state_dict_to_tree({k: v for k, v in sd.items() if not keys.is_pe_buffer(k)})
  check_tree(tree, param_shapes(config, unet), f"{where} (SparseCtrl {config.kind})")
  return tree, config, unet


def load_sparse_ctrl(path: str, overrides: Optional[dict] = None, info: Optional[dict] = None,
                     progress: Optional[bool] = None) -> tuple[dict, SparseCtrlConfig, UNetConfig]:
  """An official SparseCtrl file (`v3_sd15_sparsectrl_rgb.ckpt`, `..._scribble.ckpt`, possibly
  wrapped in "controlnet" / "state_dict"), a diffusers `SparseControlNetModel` folder
  (config.json + weights) or its weights file -> (tree, SparseCtrlConfig, UNetConfig)."""
  info = info if info is not None else {}
  info.setdefault("notes", [])
  dcfg = {}
  if os.path.isdir(path):
    sd, dcfg = io.load_diffusers_component(path, info, progress)
  else:
    sd = io.load_torch_file(path, info, progress)
  return tree_from_state_dict(sd, path, dcfg, info.get("animatediff_config"), overrides, info)


# ---------------------------------------------------------------- export
def sparse_ctrl_state_dict(tree: dict, config: SparseCtrlConfig, fmt: str = "original",
                           extras: Optional[dict] = None, with_pe: Optional[bool] = None) -> dict:
  """Our tree -> a state dict in `fmt`. pe buffers: always for "diffusers" (registered there);
  for "original" when `with_pe` (default: when extras hold them, i.e. the source file had them).
  Buffers come from extras (bit-exact round trips) or are computed as PyTorch does."""
  if fmt not in FORMATS:
    raise ConversionError(f"unknown SparseCtrl format {fmt!r}: use original or diffusers")
  extras = extras or {}
  sd = tree_to_state_dict(tree)
  if with_pe is None:
    with_pe = fmt == "diffusers" or bool(extras)
  if with_pe:
    heads = sorted({k[: -len("proj_in.weight")] for k in sd
                    if "motion_modules." in k and k.endswith(".temporal_transformer.proj_in.weight")})
    for h in heads:
      for i in range(config.motion.num_transformer_blocks):
        for a in range(config.motion.num_attention_blocks):
          k = f"{h}transformer_blocks.{i}.attention_blocks.{a}.pos_encoder.pe"
          w = sd[h + "proj_in.weight"]
          v = extras.get(k)
          sd[k] = (np.asarray(v) if v is not None else _torch_pe(config.motion.max_len, w.shape[0])).astype(
              w.dtype, copy=False)
  if fmt == "diffusers":
    out = {}
    for k, v in sd.items():
      d = keys.official_to_diffusers(k)
      if keys.is_pe_buffer(k) and not k.endswith(".attention_blocks.0.pos_encoder.pe"):
        continue  # diffusers keeps one buffer per transformer block
      out[d] = v
    sd = out
  return sd


def diffusers_config(config: SparseCtrlConfig, unet: UNetConfig) -> dict:
  """The `config.json` of a diffusers `SparseControlNetModel` with this architecture."""
  m = config.motion
  if m.norm_groups != unet.norm_num_groups or m.num_attention_blocks != 1 or m.mid_block:
    raise ConversionError("diffusers' SparseControlNetModel cannot express this SparseCtrl (motion "
                          "GroupNorm groups differ from the UNet's, or not one attention block, "
                          "or a mid-block motion module)")
  heads = unet.attention_heads
  return {"_class_name": "SparseControlNetModel", "in_channels": unet.in_channels,
          "conditioning_channels": config.conditioning_channels,
          "flip_sin_to_cos": unet.flip_sin_to_cos, "freq_shift": unet.freq_shift,
          "down_block_types": ["CrossAttnDownBlockMotion" if c else "DownBlockMotion"
                               for c in unet.cross_attention_levels],
          "block_out_channels": list(unet.block_out_channels), "layers_per_block": unet.layers_per_block,
          "norm_num_groups": unet.norm_num_groups, "norm_eps": unet.norm_eps,
          "cross_attention_dim": unet.cross_attention_dim,
          "transformer_layers_per_block": unet.transformer_depth,
          "temporal_transformer_layers_per_block": m.num_transformer_blocks,
          "attention_head_dim": list(heads) if isinstance(heads, tuple) else heads,
          "use_linear_projection": unet.use_linear_projection,
          "conditioning_embedding_out_channels": list(config.conditioning_embedding_channels),
          "motion_max_seq_length": m.max_len, "motion_num_attention_heads": m.num_heads,
          "concat_conditioning_mask": config.concat_conditioning_mask,
          "use_simplified_condition_embedding": config.use_simplified_condition_embedding}


def export_sparse_ctrl(tree: dict, config: SparseCtrlConfig, unet: UNetConfig, out: str,
                       fmt: str = "original", extras: Optional[dict] = None,
                       with_pe: Optional[bool] = None) -> None:
  """original: one `.ckpt` / `.safetensors` file in the official layout; diffusers: a folder
  (`diffusion_pytorch_model.safetensors` + `config.json`) that `SparseControlNetModel.from_pretrained` loads."""
  sd = sparse_ctrl_state_dict(tree, config, fmt, extras, with_pe)
  if fmt == "original":
    io.save_torch_file(sd, out)
    return
  io.save_diffusers_component(out, sd, diffusers_config(config, unet))
