"""Export trained weights: original PyTorch files (with the converter) and an Orbax model dir.

  motion_module   -> motion_module.{safetensors,ckpt}  (official mm_sd_*.ckpt key layout)
  motion_lora     -> motion_lora.{...}                 (official processor-LoRA keys)
  domain_adapter  -> domain_adapter.{...}              (v3_sd15_adapter layout)
  every stage     -> model/  Orbax dir with unet, motion_module, text_encoder, vae (+ LoRA
                     items) and metadata.json, as `python -m convert_weights to-orbax` writes
                     it, so `python sample.py --ckpt model/` and `train.py model=model/` load it.

Image-only models (image, vae, domain_adapter stages on a base without one) get a fresh motion
module whose output projection is zero: the identity, so sampling shows the image model alone.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from adiff_jax.pipeline import ModelConfig
from adiff_jax.train.config import TrainConfig, to_dict
from adiff_jax.params import random_like
from adiff_jax.train.state import Base, flat, motion_config, split, unet_shapes, unflat

Pytree = Any


def _np(tree: Pytree) -> Pytree:
  return {k: _np(v) for k, v in tree.items()} if isinstance(tree, dict) else np.array(tree)  # writable copy (torch warns otherwise)


def _identity_motion(cfg: TrainConfig, model: ModelConfig, base_meta: dict):
  motion = model.motion
  if motion is None and "motion_module" in base_meta.get("configs", {}):
    # Keep the base's (e.g. an earlier stage's identity module): the tiny chain stays tiny.
    from convert_weights.orbax_io import motion_config_from_meta
    motion = motion_config_from_meta(base_meta)
  if motion is None:
    if cfg.model == "tiny":
      motion = ModelConfig.tiny().motion
      if cfg.motion_overrides or cfg.motion_preset != "v3":
        motion = motion_config(cfg)
    else:
      motion = motion_config(cfg)
  shapes = {k: v for k, v in flat(unet_shapes(model.unet, motion)).items() if "motion_modules_" in k}
  return random_like(unflat(shapes), cfg.seed), motion


def export(cfg: TrainConfig, base: Base, tree: dict, out_dir: str, step: int,
           log=print) -> list[str]:
  """tree: the full trained model tree (numpy), {"unet", "text_encoder", "vae", ["lora"]}.
  Returns the written paths."""
  from convert_weights import lora_files, motion as motion_io, orbax_io
  from convert_weights.base import config_dict

  os.makedirs(out_dir, exist_ok=True)
  ext = "." + cfg.export.format
  written = []
  model = base.config
  mm, unet = split(_np(tree["unet"]), lambda p: "motion_modules_" in p)
  motion_cfg = model.motion
  mm_version = f"trained by train.py (stage {cfg.stage}, step {step})"
  if cfg.stage != "motion_module":
    mm_version = base.meta.get("versions", {}).get("motion_module", "untrained")
  if not flat(mm):
    mm, motion_cfg = _identity_motion(cfg, model, base.meta)
    mm_version = "identity (untrained, zero output projection): the image model alone"

  if cfg.stage == "motion_module":
    path = os.path.join(out_dir, "motion_module" + ext)
    motion_io.export_motion_module(mm, motion_cfg, path, "original")
    written.append(path)
  if cfg.stage in ("motion_lora", "domain_adapter"):
    path = os.path.join(out_dir, cfg.stage + ext)
    lora_files.export_lora(_np(tree["lora"]), path)
    written.append(path)

  if cfg.export.model_dir:
    items = {"unet": unet, "motion_module": mm, "text_encoder": _np(tree["text_encoder"]),
             "vae": _np(tree["vae"])}
    meta = {"dtype": "fp32", "versions": {"motion_module": mm_version}, "sources": {},
            "formats": {}, "extras": {}, "notes": [],
            "configs": {"unet": config_dict(model.unet), "motion_module": config_dict(motion_cfg),
                        "text_encoder": config_dict(model.text), "vae": config_dict(model.vae)},
            "training": {"stage": cfg.stage, "step": step, "config": to_dict(cfg),
                         "base": cfg.model}}
    # Keep adapters the base carried; add the one trained here.
    for name in ("domain_adapter",):
      if name in base.meta.get("items", []) and cfg.stage != name:
        trees, _ = orbax_io.load_model_dir(cfg.model, [name])
        items[name] = trees[name]
        meta[name] = base.meta.get(name)
    if cfg.stage == "domain_adapter":
      items["domain_adapter"] = _np(tree["lora"])
      meta["domain_adapter"] = {"item": "domain_adapter", "scale": cfg.lora_alpha}
    if cfg.stage == "motion_lora":
      items["motion_lora_0"] = _np(tree["lora"])
      meta["motion_loras"] = [{"item": "motion_lora_0", "alpha": cfg.lora_alpha}]
    path = os.path.join(out_dir, "model")
    orbax_io.save_model_dir(path, items, meta, overwrite=True)
    written.append(path)
  for p in written:
    log(f"exported {p}")
  return written
