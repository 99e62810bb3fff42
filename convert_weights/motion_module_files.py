"""AnimateDiff motion modules: original / diffusers MotionAdapter / train.py files <-> our tree.

Our tree holds only the `motion_modules_*` subtrees in UNet3D layout
(`down_blocks_0/motion_modules_1/temporal_transformer/...`); merge it into a base UNet tree
with `adiff_jax.motion_module.merge_motion_module`.

The sinusoidal `pe` buffer is not a parameter (we recompute it). Its length decides the
version: 24 -> v1; 32 with a mid-block module -> v2; 32 without -> v3. Files without `pe`
(newer official code does not persist it): the length comes from `animatediff_config`
(`temporal_position_encoding_max_len`) or a MotionAdapter `config.json`
(`motion_max_seq_length`); failing both, a mid-block module means v2, otherwise we ASSUME v3
(pe 32) and say so in the notes, since v1 and v3 have identical weights otherwise; pass
`version="v1"` for an mm_sd_v14/v15 file stripped of its pe. A known published file
(`detect.KNOWN_FILES`, by name) without pe gets its own code's length: AnimateLCM 64.
SDXL (mm_sdxl_v10_beta, official `sdxl` branch): motion modules at the 3 SDXL levels only
(down 0-2 x 2, up 0-2 x 3, no mid block) -> version "sdxl" (`MotionModuleConfig.sdxl()`:
its GroupNorm pools over frames), pe 32 unless the file says otherwise.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adiff_jax.embeddings import motion_positional_encoding
from adiff_jax.motion_module import MotionModule, MotionModuleConfig, is_motion_module
from convert_weights import io
from convert_weights.detect import detect_keys, known_file, motion_module_family
from convert_weights.errors import ConversionError, few
from convert_weights.motion_module_keys import diffusers_to_official, is_pe_buffer, official_to_diffusers
from adiff_jax.params import flatten
from convert_weights.tree import check_tree, state_dict_to_tree, tree_to_state_dict

_MODULE = re.compile(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.(\d+)\.")


def _find(cfg: Any, name: str):
  """A key anywhere in a nested dict/list config (animatediff_config layouts vary)."""
  if isinstance(cfg, dict):
    if name in cfg:
      return cfg[name]
    cfg = list(cfg.values())
  if isinstance(cfg, (list, tuple)):
    for v in cfg:
      r = _find(v, name)
      if r is not None:
        return r
  return None


@functools.lru_cache(maxsize=None)
def _expected_module(cfg: MotionModuleConfig, channels: int) -> dict:
  x = jax.ShapeDtypeStruct((1, 2, 1, 1, channels), jnp.float32)
  return jax.eval_shape(MotionModule(cfg).init, jax.random.key(0), x)["params"]


def _module_prefixes(keys) -> list[str]:
  return sorted({m.group(0)[:-1] for k in keys if (m := _MODULE.match(k))})


def detect_version(has_mid: bool, pe_len: Optional[int], config_len: Optional[int],
                   notes: list) -> tuple[str, int]:
  """(version, pe length) from the facts a file gives (see the module docstring)."""
  length = pe_len or config_len
  if length is None:
    length = 32
    if not has_mid:
      notes.append("no pe buffer and no config: assumed v3 (pe length 32); v1 (24) looks the "
                   "same without pe, pass version='v1' for mm_sd_v14/v15")
  if has_mid:
    return "v2", length
  return ("v1" if length == 24 else "v3"), length


def load_motion_module(path: str, version: Optional[str] = None, num_heads: Optional[int] = None,
                       norm_groups: Optional[int] = None, info: Optional[dict] = None,
                       progress: Optional[bool] = None) -> tuple[dict, MotionModuleConfig, str]:
  """A motion module file (original `.ckpt/.safetensors`, diffusers MotionAdapter folder or file,
  or a whole-UNet train.py output) -> (tree of motion_modules_* subtrees, config, version).

  info (optional dict) receives `notes`, `format` and `extras`: the pe buffers as stored (by
  their original keys), so an export to the same format can write them back bit-exactly.
  """
  info = info if info is not None else {}
  notes = info.setdefault("notes", [])
  adapter_cfg = {}
  if os.path.isdir(path):
    sd, adapter_cfg = io.load_diffusers_component(path, info, progress)
  else:
    sd = io.load_torch_file(path, info, progress)
  fmt = detect_keys(sd)
  if fmt not in ("motion_module_original", "motion_module_diffusers", "unet_with_motion_modules"):
    raise ConversionError(f"{path}: not a motion module: found {fmt} "
                          f"(keys such as {few(list(sd)[:3], 3)})")
  if fmt == "unet_with_motion_modules":
    n = len(sd)
    sd = {k: v for k, v in sd.items() if "motion_modules." in k}
    notes.append(f"whole UNet state dict: took the {len(sd)} motion-module tensors of {n}")
    fmt = "motion_module_original" if any(".temporal_transformer." in k for k in sd) else "motion_module_diffusers"
  info["format"] = "original" if fmt == "motion_module_original" else "diffusers"

  # Split off pe buffers; the rest goes to official names, which our tree mirrors.
  pe = {k: v for k, v in sd.items() if is_pe_buffer(k)}
  params = {k: v for k, v in sd.items() if not is_pe_buffer(k)}
  if info["format"] == "diffusers":
    params = {diffusers_to_official(k): v for k, v in params.items()}
  info["extras"] = pe
  pe_lens = {int(v.shape[1]) for v in pe.values()}
  if len(pe_lens) > 1:
    raise ConversionError(f"{path}: pe buffers of different lengths {sorted(pe_lens)}")
  prefixes = _module_prefixes(params)
  has_mid = any(p.startswith("mid_block") for p in prefixes)
  config_len = adapter_cfg.get("motion_max_seq_length") or _find(
      info.get("animatediff_config"), "temporal_position_encoding_max_len")
  known = known_file(path, fmt)
  if not pe_lens and not config_len:
    if known and known[0].pe_len:
      config_len = known[0].pe_len
      notes.append(f"no pe buffers: built (sinusoidal) with length {config_len}, the length the code "
                   f"of this file uses ({known[1]})")
    elif has_mid:
      notes.append("mid-block module without pe buffers (official v2 files store them; "
                   "AnimateLCM's file does not): built (sinusoidal) with length 32")
  if motion_module_family(params) == "sdxl":  # 3 levels, no mid: mm_sdxl_v10_beta (pe 32)
    detected, length = "sdxl", next(iter(pe_lens), None) or config_len or 32
  else:
    detected, length = detect_version(has_mid, next(iter(pe_lens), None), config_len, notes)
  if version is not None and version != detected:
    notes.append(f"version {version} requested; the file looks like {detected}")
  version = version or detected
  heads = num_heads or adapter_cfg.get("motion_num_attention_heads") or _find(
      info.get("animatediff_config"), "num_attention_heads") or 8
  groups = norm_groups or adapter_cfg.get("motion_norm_num_groups") or 32
  levels = sorted({int(m.group(1)) for p in prefixes if (m := re.match(r"down_blocks\.(\d+)", p))})
  cfg = MotionModuleConfig.preset(version, max_len=int(length), num_heads=int(heads),
                                  norm_groups=int(groups), mid_block=has_mid,
                                  resolutions=tuple(2 ** i for i in levels) or (1, 2, 4, 8))
  tree = state_dict_to_tree(params)
  _check(tree, cfg, path)
  return tree, cfg, version


def _check(tree: dict, cfg: MotionModuleConfig, where: str) -> None:
  flat = flatten(tree)
  mods = sorted({"/".join(k.split("/")[:2]) for k in flat})
  if not mods:
    raise ConversionError(f"{where}: no motion-module tensors")
  for m in mods:
    if not is_motion_module(m):
      raise ConversionError(f"{where}: unexpected tensors outside motion modules under {m}")
    sub = tree
    for p in m.split("/"):
      sub = sub[p]
    c = np.shape(sub.get("temporal_transformer", {}).get("proj_in", {}).get("kernel", np.zeros((0,))))
    if len(c) != 2:
      raise ConversionError(f"{where}: motion module {m} has no proj_in weight")
    check_tree(sub, _expected_module(cfg, int(c[0])), f"{where} ({m})")


# ---------------------------------------------------------------- export
def _pe_value(prefix: str, key_fmt: str, extras: dict, cfg: MotionModuleConfig, channels: int, dtype):
  """The pe buffer for one module: as loaded (either format's key) or recomputed."""
  candidates = [f"{prefix}.temporal_transformer.transformer_blocks.0.attention_blocks.{i}.pos_encoder.pe"
                for i in (0, 1)] + [f"{prefix}.transformer_blocks.0.pos_embed.pe"]
  for c in [key_fmt] + candidates:
    if c in extras:
      return np.asarray(extras[c]).astype(dtype, copy=False)  # no-op for same-dtype round trips
  return _torch_pe(cfg.max_len, channels).astype(dtype)


def _torch_pe(max_len: int, dim: int) -> np.ndarray:
  """The pe buffer exactly as PyTorch computes it (official code and diffusers use the same
  formula); numpy's exp/sin differ in the last ulp, torch is what every file was written with."""
  try:
    import math
    import torch
  except ImportError:
    return motion_positional_encoding(max_len, dim)
  position = torch.arange(max_len).unsqueeze(1)
  div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
  pe = torch.zeros(1, max_len, dim)
  pe[0, :, 0::2] = torch.sin(position * div_term)
  pe[0, :, 1::2] = torch.cos(position * div_term)
  return pe.numpy()


def motion_module_state_dict(tree: dict, cfg: MotionModuleConfig, fmt: str = "original",
                             extras: Optional[dict] = None, with_pe: Optional[bool] = None) -> dict:
  """Our motion-module tree -> a state dict in `fmt` ("original" | "diffusers").

  pe buffers: "diffusers" always has them (MotionAdapter registers them); "original" has them
  when `with_pe` (default: when the loaded file had them, i.e. extras holds pe).
  """
  extras = extras or {}
  sd = tree_to_state_dict(tree)
  if fmt == "diffusers":
    sd = {official_to_diffusers(k): v for k, v in sd.items()}
    with_pe = True
  elif fmt != "original":
    raise ConversionError(f"unknown motion-module format {fmt!r}: use original or diffusers")
  elif with_pe is None:
    with_pe = bool(extras)
  if with_pe:
    for prefix in _module_prefixes(sd):
      w = sd[f"{prefix}.proj_in.weight" if fmt == "diffusers" else f"{prefix}.temporal_transformer.proj_in.weight"]
      keys = ([f"{prefix}.transformer_blocks.0.pos_embed.pe"] if fmt == "diffusers" else
              [f"{prefix}.temporal_transformer.transformer_blocks.0.attention_blocks.{i}.pos_encoder.pe"
               for i in range(cfg.num_attention_blocks)])
      for k in keys:
        sd[k] = _pe_value(prefix, k, extras, cfg, w.shape[0], w.dtype)
  return sd


def adapter_config(tree: dict, cfg: MotionModuleConfig) -> dict:
  """The MotionAdapter `config.json` for a tree (levels / channels read from the tree)."""
  flat = flatten(tree)
  levels = sorted({int(m.group(1)) for k in flat if (m := re.match(r"down_blocks_(\d+)/", k))})
  chans = [int(flat[f"down_blocks_{i}/motion_modules_0/temporal_transformer/proj_in/kernel"].shape[0])
           for i in levels]
  layers = len({m.group(1) for k in flat if (m := re.match(r"down_blocks_0/motion_modules_(\d+)/", k))})
  from diffusers import __version__ as dv  # recorded like diffusers does; not needed to load
  return {"_class_name": "MotionAdapter", "_diffusers_version": dv, "block_out_channels": chans,
          "motion_layers_per_block": layers, "motion_mid_block_layers_per_block": 1,
          "motion_transformer_layers_per_block": 1,
          "motion_num_attention_heads": cfg.num_heads, "motion_norm_num_groups": cfg.norm_groups,
          "motion_max_seq_length": cfg.max_len, "use_motion_mid_block": cfg.mid_block,
          "conv_in_channels": None}


def export_motion_module(tree: dict, cfg: MotionModuleConfig, out: str, fmt: str = "original",
                         extras: Optional[dict] = None, with_pe: Optional[bool] = None) -> None:
  """original: one `.ckpt`/`.safetensors` file; diffusers: a MotionAdapter folder
  (`diffusion_pytorch_model.safetensors` + `config.json`) that `MotionAdapter.from_pretrained` loads."""
  sd = motion_module_state_dict(tree, cfg, fmt, extras, with_pe)
  if fmt == "original":
    io.save_torch_file(sd, out)
    return
  try:
    config = adapter_config(tree, cfg)
  except ImportError:
    raise ConversionError("writing a MotionAdapter config needs diffusers installed") from None
  io.save_diffusers_component(out, sd, config)
