"""ControlNet files (LDM `.pth` / `.safetensors` as lllyasviel publishes them, with or without the
`control_model.` prefix; diffusers `ControlNetModel` folders or weights files) <-> our
`adiff_jax.controlnet.ControlNet` tree. Names: `controlnet_keys`.

What the weights cannot tell (spatial attention heads, GroupNorm groups and eps, the time
embedding's sin/cos order and shift) comes from a diffusers `config.json`, else from the base
UNet's `UNetConfig` when given (`unet=`), else SD1.5's. `global_pool_conditions` (only the v1.1
shuffle model) comes from `config.json`, an LDM yaml beside the file (`<name>.yaml`,
`global_average_pooling`) or, failing both, the file name (`shuffle`, with a note).
`overrides={"unet": {field: value}, "controlnet": {field: value}}` set any of them.
LDM ControlNets store no buffers, so every round trip is a renaming (bit-exact, any dtype).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import numpy as np

from adiff_jax.controlnet import ControlNetConfig, check_compatible, param_shapes
from adiff_jax.errors import InputError
from adiff_jax.unet import UNetConfig
from convert_weights import controlnet_keys as keys
from convert_weights import io
from convert_weights.detect import FORMATS as FORMAT_NAMES, detect_keys
from convert_weights.errors import ConversionError, few
from convert_weights.sd_base import infer_unet_config, unet_config_from_diffusers
from convert_weights.tree import check_tree, state_dict_to_tree, tree_to_state_dict

FORMATS = ("ldm", "diffusers")
# UNetConfig fields the weights cannot tell: taken from the base UNet when one is given.
_UNSEEN = ("attention_heads", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift")
# diffusers ControlNetModel config values this implementation has (others are refused).
_DIFFUSERS_FIXED = {"class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
                    "encoder_hid_dim_type": None, "num_class_embeds": None, "act_fn": "silu",
                    "resnet_time_scale_shift": "default", "mid_block_type": "UNetMidBlock2DCrossAttn",
                    "downsample_padding": 1, "mid_block_scale_factor": 1, "only_cross_attention": False}
_NOT_CONTROLNET = {
    "sparse_ctrl_original": "an AnimateDiff SparseCtrl (v3 keyframe ControlNet with motion modules), "
                            "not a dense ControlNet: load it with load_sparse_ctrl (sample.py --sparsectrl)",
    "sparse_ctrl_diffusers": "an AnimateDiff SparseCtrl (diffusers SparseControlNetModel), not a dense "
                             "ControlNet: load it with load_sparse_ctrl (sample.py --sparsectrl)",
    "motion_module_original": "an AnimateDiff motion module, not a ControlNet (--motion-module)",
    "motion_module_diffusers": "an AnimateDiff motion module (MotionAdapter), not a ControlNet (--motion-module)",
    "unet_with_motion_modules": "a video UNet with motion modules, not a ControlNet",
    "ldm": "an SD1.x checkpoint (model.diffusion_model.*) without ControlNet weights (control_model.*)",
    "diffusers_unet": "a diffusers UNet, not a ControlNet",
}


def _refuse_family(sd: dict, where: str) -> None:
  fam = keys.family(sd)
  if fam == "sdxl":
    raise ConversionError(f"{where}: an SDXL ControlNet (added text/time embedding: label_emb / "
                          "add_embedding): not supported, SD1.5 ControlNets only")
  if fam == "sd2":
    raise ConversionError(f"{where}: an SD2.x ControlNet (1024-wide cross-attention): not supported, "
                          "SD1.5 ControlNets only")


def _check_diffusers_config(dc: dict, where: str) -> None:
  cls = dc.get("_class_name")
  if cls not in (None, "ControlNetModel"):
    raise ConversionError(f"{where}: config.json describes a {cls}, not a ControlNetModel")
  if dc.get("addition_embed_type"):
    raise ConversionError(f"{where}: an SDXL ControlNet (addition_embed_type "
                          f"{dc['addition_embed_type']!r}): not supported, SD1.5 ControlNets only")
  bad = [f"{k}={dc[k]!r}" for k, v in _DIFFUSERS_FIXED.items() if k in dc and dc[k] != v]
  if bad:
    raise ConversionError(f"{where}: config.json has settings this ControlNet does not implement: "
                          f"{', '.join(bad)}")


def _yaml_global_pool(path: str) -> Optional[bool]:
  """`global_average_pooling` of the LDM yaml beside a file (`control_v11e_sd15_shuffle.yaml`)."""
  cfg = os.path.splitext(path)[0] + ".yaml"
  if not os.path.isfile(cfg):
    return None
  import yaml
  try:
    with open(cfg) as f:
      y = yaml.safe_load(f)
    p = y["model"]["params"]["control_stage_config"]["params"]
  except Exception:  # noqa: BLE001 - not an LDM ControlNet yaml: ignore it
    return None
  return bool(p.get("global_average_pooling", False))


def infer_configs(sd: dict, diffusers_cfg: Optional[dict] = None, unet: Optional[UNetConfig] = None,
                  overrides: Optional[dict] = None) -> tuple[ControlNetConfig, UNetConfig]:
  """(ControlNetConfig, UNetConfig) of a diffusers-named ControlNet state dict."""
  dc, ov = diffusers_cfg or {}, overrides or {}
  if dc.get("block_out_channels"):
    ucfg = unet_config_from_diffusers(dc)
    if dc.get("num_attention_heads"):        # diffusers: num_attention_heads or attention_head_dim
      h = dc["num_attention_heads"]
      ucfg = dataclasses.replace(ucfg, attention_heads=tuple(h) if isinstance(h, list) else h)
  else:
    base = {f: getattr(unet, f) for f in _UNSEEN} if unet is not None else {}
    ucfg = infer_unet_config(sd, **base)
  if ov.get("unet"):
    ucfg = dataclasses.replace(ucfg, **ov["unet"])
  first = sd.get("controlnet_cond_embedding.conv_in.weight")
  if first is None:
    raise ConversionError("no condition embedding (controlnet_cond_embedding.conv_in / input_hint_block.0)")
  n = len({m.group(1) for k in sd if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))})
  emb = (int(first.shape[0]),) + tuple(
      int(sd[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"].shape[0]) for i in range(n // 2)
      if f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight" in sd)
  kw = dict(conditioning_channels=int(first.shape[1]), conditioning_embedding_channels=emb,
            global_pool_conditions=bool(dc.get("global_pool_conditions", False)),
            conditioning_channel_order=dc.get("controlnet_conditioning_channel_order", "rgb"))
  kw.update(ov.get("controlnet", {}))
  return ControlNetConfig(**kw), ucfg


def tree_from_state_dict(sd: dict, where: str = "state dict", diffusers_cfg: Optional[dict] = None,
                         unet: Optional[UNetConfig] = None, overrides: Optional[dict] = None,
                         info: Optional[dict] = None) -> tuple[dict, ControlNetConfig, UNetConfig]:
  """A ControlNet state dict, LDM (with or without `control_model.`) or diffusers names (torch
  tensors or numpy) -> (tree, ControlNetConfig, UNetConfig). `unet`: the base UNet's config,
  for what the weights cannot tell, and checked to fit. info receives `format` ("ldm" |
  "diffusers"), `prefix` (LDM: "control_model." or ""), `notes`."""
  info = info if info is not None else {}
  notes = info.setdefault("notes", [])
  sd = {k: (io.tensor_to_numpy(v) if hasattr(v, "detach") else np.asarray(v)) for k, v in sd.items()}
  if "difference" in sd:
    raise ConversionError(f"{where}: a 'difference' ControlNet (weights stored relative to an SD1.5 "
                          "base model): not supported, use the full ControlNet file")
  if "lora_controlnet" in sd:
    raise ConversionError(f"{where}: a Control-LoRA (Stability AI, for SDXL): not supported")
  prefix = keys.ldm_prefix(sd)
  if prefix is not None:
    info.update(format="ldm", prefix=prefix)
    sd, rest = keys.strip_ldm(sd, prefix)
    if rest:
      notes.append(f"ignored {len(rest)} tensors outside {prefix!r} (a v1.0 file's SD1.5 model: "
                   f"{few(rest, 3)})")
    _refuse_family(sd, where)
    sd = keys.ldm_to_diffusers(sd)
  elif keys.is_diffusers_controlnet(sd):
    info.update(format="diffusers")
    _refuse_family(sd, where)
  else:
    fmt = detect_keys(sd)
    what = _NOT_CONTROLNET.get(fmt) or f"not a ControlNet: found {fmt} ({FORMAT_NAMES[fmt]})"
    raise ConversionError(f"{where}: {what} (keys such as {few(list(sd)[:3], 3)})")
  if diffusers_cfg:
    _check_diffusers_config(diffusers_cfg, where)
  try:
    config, ucfg = infer_configs(sd, diffusers_cfg, unet, overrides)
  except (KeyError, StopIteration) as e:
    raise ConversionError(f"{where}: an incomplete ControlNet (no {e})") from None
  except InputError as e:
    raise ConversionError(f"{where}: {e}") from None
  if ucfg.cross_attention_dim != 768 and ucfg.block_out_channels == (320, 640, 1280, 1280):
    raise ConversionError(f"{where}: cross-attention width {ucfg.cross_attention_dim} (SD1.5 has 768): "
                          "not an SD1.5 ControlNet, not supported")
  if unet is not None:
    try:
      check_compatible(ucfg, unet)
    except InputError as e:  # the library's error: name the file
      raise ConversionError(f"{where}: {e}") from None
  tree = state_dict_to_tree(sd)
  check_tree(tree, param_shapes(config, ucfg), f"{where} (ControlNet)")
  return tree, config, ucfg


def load_controlnet(path: str, unet: Optional[UNetConfig] = None, overrides: Optional[dict] = None,
                    info: Optional[dict] = None, progress: Optional[bool] = None
                    ) -> tuple[dict, ControlNetConfig, UNetConfig]:
  """A ControlNet file or folder -> (tree, ControlNetConfig, UNetConfig): lllyasviel LDM files
  (`control_sd15_*.pth` v1.0, whose SD1.5 model part is ignored; `control_v11*_sd15_*.pth`;
  `.safetensors` re-saves with or without `control_model.`), a diffusers `ControlNetModel`
  folder (config.json + weights; a pipeline folder's `controlnet/`), or a bare diffusers weights
  file. `unet`: the base UNet's config (what the weights cannot tell; checked to fit). Errors
  (ConversionError) name the file: SDXL / SD2 ControlNets, SparseCtrl, motion modules, corrupt
  files, missing or misshapen keys."""
  info = info if info is not None else {}
  info.setdefault("notes", [])
  dcfg: dict = {}
  if os.path.isdir(path):
    sub = os.path.join(path, "controlnet")
    if os.path.isfile(os.path.join(sub, "config.json")):
      path = sub
    if io.component_weights(path) is None:
      raise ConversionError(f"{path}: a folder without a ControlNet weights file "
                            "(diffusion_pytorch_model.safetensors / .bin)")
    sd, dcfg = io.load_diffusers_component(path, info, progress)
  else:
    sd = io.load_torch_file(path, info, progress)
  ov = dict(overrides or {})
  if not dcfg.get("global_pool_conditions") and "global_pool_conditions" not in ov.get("controlnet", {}):
    pool = _yaml_global_pool(path) if not os.path.isdir(path) else None
    if pool is None and not dcfg and re.search(r"shuffle", os.path.basename(path), re.IGNORECASE):
      pool = True
      info["notes"].append("a shuffle ControlNet by its name: global_pool_conditions=True (as "
                           "control_v11e_sd15_shuffle.yaml); override with "
                           "overrides={'controlnet': {'global_pool_conditions': False}}")
    if pool:
      ov["controlnet"] = {**ov.get("controlnet", {}), "global_pool_conditions": True}
  return tree_from_state_dict(sd, path, dcfg, unet, ov, info)


# ---------------------------------------------------------------- export
def controlnet_state_dict(tree: dict, fmt: str = "diffusers", prefix: str = keys.LDM_PREFIX) -> dict:
  """Our tree -> a state dict in diffusers names, or LDM names under `prefix` ("control_model."
  as lllyasviel's v1.1 files, or "")."""
  if fmt not in FORMATS:
    raise ConversionError(f"unknown ControlNet format {fmt!r}: use ldm or diffusers")
  sd = tree_to_state_dict(tree)
  if fmt == "diffusers":
    return sd
  return {prefix + k: v for k, v in keys.diffusers_to_ldm(sd).items()}


def diffusers_config(config: ControlNetConfig, unet: UNetConfig) -> dict:
  """The `config.json` of a diffusers `ControlNetModel` with this architecture."""
  if unet.addition_embed_type is not None:
    raise ConversionError("SDXL ControlNets are not supported")
  heads = unet.attention_heads
  return {"_class_name": "ControlNetModel", "in_channels": unet.in_channels,
          "conditioning_channels": config.conditioning_channels,
          "flip_sin_to_cos": unet.flip_sin_to_cos, "freq_shift": unet.freq_shift,
          "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D"
                               for c in unet.cross_attention_levels],
          "only_cross_attention": False, "block_out_channels": list(unet.block_out_channels),
          "layers_per_block": unet.layers_per_block, "downsample_padding": 1,
          "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": unet.norm_num_groups,
          "norm_eps": unet.norm_eps, "cross_attention_dim": unet.cross_attention_dim,
          "transformer_layers_per_block": (list(unet.transformer_depth)
                                           if isinstance(unet.transformer_depth, tuple) else unet.transformer_depth),
          "attention_head_dim": list(heads) if isinstance(heads, tuple) else heads,
          "use_linear_projection": unet.use_linear_projection, "class_embed_type": None,
          "num_class_embeds": None, "upcast_attention": False, "resnet_time_scale_shift": "default",
          "controlnet_conditioning_channel_order": config.conditioning_channel_order,
          "conditioning_embedding_out_channels": list(config.conditioning_embedding_channels),
          "global_pool_conditions": config.global_pool_conditions}


def export_controlnet(tree: dict, config: ControlNetConfig, unet: UNetConfig, out: str,
                      fmt: str = "diffusers", prefix: str = keys.LDM_PREFIX) -> None:
  """diffusers: a folder (`diffusion_pytorch_model.safetensors` + `config.json`) that
  `ControlNetModel.from_pretrained` loads; ldm: one `.safetensors` / `.pth` / `.ckpt` file in
  lllyasviel's layout (keys under `prefix`, default "control_model." as the v1.1 files)."""
  sd = controlnet_state_dict(tree, fmt, prefix)
  if fmt == "ldm":
    io.save_torch_file(sd, out)
    return
  io.save_diffusers_component(out, sd, diffusers_config(config, unet))
