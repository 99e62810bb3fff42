"""Export trained weights as a model dir (`adiff_jax.model_dir`):

  every stage     -> model/  Orbax dir with unet, motion_module, text_encoder, vae (+ LoRA
                     items) and metadata.json, as `python -m convert_weights to-orbax` writes
                     it, so `python sample.py --ckpt model/` and `train.py model=model/` load it.

The original PyTorch files (motion_module.ckpt, motion_lora.ckpt, domain_adapter.ckpt) are
written from that dir by the converter (`convert_weights.convert.export_stage`), which
`train.py` passes to the Trainer as `export_files`: the library never imports the converters.

Image-only models (image, vae, domain_adapter stages on a base without one) get a fresh motion
module whose output projection is zero: the identity, so sampling shows the image model alone.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Callable, Optional

import numpy as np

from adiff_jax import model_dir
from adiff_jax.model import ModelConfig, new_motion_module
from adiff_jax.motion_module import split_motion_module
from adiff_jax.params import flatten
from adiff_jax.train.config import TrainConfig, to_dict
from adiff_jax.train.state import Base, motion_config

Pytree = Any


def _np(tree: Pytree) -> Pytree:
  return {k: _np(v) for k, v in tree.items()} if isinstance(tree, dict) else np.array(tree)  # writable copy (torch warns otherwise)


def _identity_motion(cfg: TrainConfig, model: ModelConfig, base_meta: dict):
  motion = model.motion
  if motion is None and "motion_module" in base_meta.get("configs", {}):
    # Keep the base's (e.g. an earlier stage's identity module): the tiny chain stays tiny.
    motion = model_dir.config_of(base_meta, "motion_module", cfg.model)
  if motion is None:
    if cfg.model == "tiny":
      motion = ModelConfig.tiny().motion
      if cfg.motion_overrides or cfg.motion_preset != "v3":
        motion = motion_config(cfg)
    else:
      motion = motion_config(cfg)
  return new_motion_module(model.unet, motion, cfg.seed), motion


def export(cfg: TrainConfig, base: Base, tree: dict, out_dir: str, step: int, log=print,
           export_files: Optional[Callable[[str, str, str, str], list[str]]] = None) -> list[str]:
  """tree: the full trained model tree (numpy), {"unet", "text_encoder", "vae", ["lora"]}.
  export_files(model_dir, stage, out_dir, format) writes the stage's PyTorch files from the
  model dir. Returns the written paths."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  model = base.config
  unet, mm = split_motion_module(_np(tree["unet"]))
  motion_cfg = model.motion
  mm_version = f"trained by train.py (stage {cfg.stage}, step {step})"
  if cfg.stage != "motion_module":
    mm_version = base.meta.get("versions", {}).get("motion_module", "untrained")
  if not flatten(mm):
    mm, motion_cfg = _identity_motion(cfg, model, base.meta)
    mm_version = "identity (untrained, zero output projection): the image model alone"

  items = {"unet": unet, "motion_module": mm, "text_encoder": _np(tree["text_encoder"]),
           "vae": _np(tree["vae"])}
  meta = {"dtype": "fp32", "versions": {"motion_module": mm_version}, "sources": {},
          "formats": {}, "extras": {}, "notes": [],
          "configs": model_dir.configs_metadata(dataclasses.replace(model, motion=motion_cfg)),
          "training": {"stage": cfg.stage, "step": step, "config": to_dict(cfg),
                       "base": cfg.model}}
  # Keep adapters the base carried; add the one trained here.
  for name in ("domain_adapter",):
    if name in base.meta.get("items", []) and cfg.stage != name:
      trees, _ = model_dir.load_items(cfg.model, [name])
      items[name] = trees[name]
      meta[name] = base.meta.get(name)
  if cfg.stage == "domain_adapter":
    items["domain_adapter"] = _np(tree["lora"])
    meta["domain_adapter"] = {"item": "domain_adapter", "scale": cfg.lora_alpha}
  if cfg.stage == "motion_lora":
    items["motion_lora_0"] = _np(tree["lora"])
    meta["motion_loras"] = [{"item": "motion_lora_0", "alpha": cfg.lora_alpha}]
  path = os.path.join(out_dir, "model" if cfg.export.model_dir else ".model-for-export")
  model_dir.save(path, items, meta, overwrite=True)
  if export_files is not None:
    written += export_files(path, cfg.stage, out_dir, cfg.export.format)
  if cfg.export.model_dir:
    written.append(path)
  else:
    shutil.rmtree(path)
  for p in written:
    log(f"exported {p}")
  return written
