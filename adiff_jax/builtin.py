"""The built-in tiny model that `python sample.py` uses when no checkpoint is given.

  builtin          the trained tiny model when this build ships one (adiff_jax/assets/tiny_model),
                   otherwise the random one
  builtin:tiny     the trained tiny model (an error when none ships)
  builtin:random   the tiny architecture with RANDOM weights (tests; its videos are noise)
  builtin:left     (right, up, down) a built-in MotionLoRA, for --motion-lora

The shipped directory is a model dir (base + motion module) with one model dir per MotionLoRA
under `motion_loras/<direction>`, packed by `tools/ship_tiny_model.py`.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from adiff_jax import model_dir
from adiff_jax.errors import InputError
from adiff_jax.model import ModelConfig, random_params

PREFIX = "builtin"
# A tiny model trained by train.py on the synthetic dataset, shipped with the package when present.
TRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_model")
MOTION_LORAS = ("left", "right", "up", "down")
# Prompts that show the trained model off: several colours and shapes, one grid.
DEFAULT_PROMPTS = ("a red circle", "a blue square", "a yellow triangle", "a green circle",
                   "a purple square", "a cyan triangle")


def is_builtin(spec: Optional[str]) -> bool:
  return spec is None or spec == PREFIX or str(spec).startswith(PREFIX + ":")


def trained_model_dir() -> Optional[str]:
  """The shipped trained tiny model (a model dir), or None when this build has none."""
  return TRAINED_DIR if model_dir.is_model_dir(TRAINED_DIR) else None


def resolve(spec: Optional[str]) -> str:
  """"builtin" / "builtin:tiny" / "builtin:random" -> "tiny" or "random"."""
  name = "" if spec in (None, PREFIX) else str(spec)[len(PREFIX) + 1:]
  if name == "":
    return "tiny" if trained_model_dir() else "random"
  if name == "random":
    return "random"
  if name == "tiny":
    if trained_model_dir() is None:
      raise InputError("builtin:tiny: this build ships no trained tiny model "
                       "(python tools/train_tiny_chain.py makes one); builtin:random is available")
    return "tiny"
  raise InputError(f"unknown built-in model {spec!r}; choose builtin, builtin:tiny or builtin:random")


def load_random() -> tuple[ModelConfig, dict, str]:
  """(ModelConfig, params, description) of the tiny architecture with RANDOM weights."""
  config = ModelConfig.tiny()
  desc = ("built-in tiny model with RANDOM weights (builtin:random; the output is noise, not a "
          "real animation: pass --ckpt for a real model)")
  return config, random_params(config, seed=0), desc


def motion_lora_dir(spec: str) -> str:
  """"builtin:left" -> the shipped MotionLoRA's model dir."""
  name = spec[len(PREFIX) + 1:] if spec.startswith(PREFIX + ":") else spec
  if name not in MOTION_LORAS:
    raise InputError(f"unknown built-in MotionLoRA {spec!r}; choose from "
                     f"{', '.join(PREFIX + ':' + d for d in MOTION_LORAS)}")
  path = os.path.join(TRAINED_DIR, "motion_loras", name)
  if not model_dir.is_model_dir(path):
    raise InputError(f"{spec}: this build ships no built-in MotionLoRAs")
  return path


def load(spec: Optional[str] = None, motion_loras: Sequence[tuple[str, float]] = ()):
  """(ModelConfig, params, lora, description) of a built-in model; motion_loras: (name or model
  dir, alpha) pairs, names as "builtin:left"."""
  if resolve(spec) == "random":
    if motion_loras:
      raise InputError("the random built-in model has no MotionLoRAs")
    config, params, desc = load_random()
    return config, params, None, desc
  dirs = [(motion_lora_dir(p) if is_builtin(p) else p, a) for p, a in motion_loras]
  config, params, lora, _ = model_dir.load(TRAINED_DIR, motion_loras=dirs)
  names = [p for p, _ in motion_loras]
  desc = ("built-in tiny model trained on synthetic moving shapes (README: Built-in model)" +
          (f" + MotionLoRA {', '.join(names)}" if names else ""))
  return config, params, lora, desc
