"""Control during sampling: SparseCtrl and dense ControlNets as units whose residuals add up.

Each unit is a module (`sparse_ctrl.SparseControlNet` or `controlnet.ControlNet`) that turns the
UNet's input (the CFG batch), the timestep and the text into residuals for
`UNet3D(..., down_residuals=, mid_residual=)`; several units' residuals are summed (diffusers'
`MultiControlNetModel`). Their per-frame inputs (condition images, masks) travel in the text
context pytree as (B, F, H, W*C) leaves, so context windows slice them with the latents.

Per-call arguments of a unit (traced: changing them does not recompile):
  SparseCtrl: (params, scale);             per-frame leaves (condition, mask (B, F, 1, 1))
  ControlNet: (params, scale, start, end); per-frame leaves (control images,)
A ControlNet acts on the steps whose share of the schedule lies in [start, end], as diffusers'
`control_guidance_start/end` (step i of n is kept unless i/n < start or (i+1)/n > end).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from adiff_jax.errors import InputError
from adiff_jax.sharding import DATA, FRAMES, constrain


@dataclasses.dataclass(frozen=True)
class ControlNetSampling:
  """How one ControlNet acts: conditioning_scale (diffusers `controlnet_conditioning_scale`),
  start/end (shares of the schedule, `control_guidance_start/end`), guess_mode (the ControlNet
  sees the conditional half only and the unconditional half gets no residuals, as diffusers'
  SD ControlNet pipelines; residual weights 0.1..1.0). A ControlNet with global pooling
  (shuffle) always runs in guess mode, as diffusers."""
  conditioning_scale: float = 1.0
  start: float = 0.0
  end: float = 1.0
  guess_mode: bool = False

  def __post_init__(self):
    if not 0.0 <= self.start < self.end <= 1.0:
      raise InputError(f"ControlNet range must satisfy 0 <= start < end <= 1; got start "
                       f"{self.start}, end {self.end}")


@dataclasses.dataclass(frozen=True, eq=False)
class ControlUnit:
  """A control module and how it is fed (static in the compiled loop)."""
  module: nn.Module
  kind: str              # "sparse" | "controlnet"
  guess_mode: bool = False

  @property
  def channels(self) -> int:
    return self.module.config.conditioning_channels


def pack_frames(a) -> Any:
  """(B, F, H, W, C) -> (B, F, H, W*C): a per-frame leaf that context windows slice like text."""
  return a.reshape(a.shape[:3] + (-1,))


def _unpack(a, channels: int):
  return constrain(a.reshape(a.shape[:3] + (-1, channels)), (DATA, FRAMES))


def residuals(units: Sequence[ControlUnit], args, leaves, x, text, tt, step, num_steps, guided: bool):
  """Summed residuals of all units for one UNet call, or {} without units.

  x (2B', F', h, w, C) when guided (uncond ++ cond), else (B', F', ...); text the same batch;
  tt (2B',) timesteps; step: the index among the steps that run (0 first), of num_steps."""
  down = mid = None
  for unit, a, lv in zip(units, args, leaves):
    m = unit.module
    if guided:
      lv = tuple(jnp.concatenate([v, v]) for v in lv)
    if unit.kind == "sparse":
      params, scale = a
      cond, mask = lv
      d, md = m.apply({"params": params}, x.astype(m.dtype), tt, text.astype(m.dtype),
                      _unpack(cond, unit.channels), mask[..., 0, 0], conditioning_scale=scale)
    else:
      params, scale, start, end = a
      keep = 1.0 - ((step / num_steps < start) | ((step + 1) / num_steps > end)).astype(jnp.float32)
      images = _unpack(lv[0], unit.channels)
      guess = unit.guess_mode or m.config.global_pool_conditions
      if guided and guess:   # the conditional half only; no residuals for the unconditional one
        half = x.shape[0] // 2
        d, md = m.apply({"params": params}, x[half:].astype(m.dtype), tt[half:],
                        text[half:].astype(m.dtype), images[half:], conditioning_scale=scale * keep,
                        guess_mode=unit.guess_mode)
        d = [jnp.concatenate([jnp.zeros_like(r), r]) for r in d]
        md = jnp.concatenate([jnp.zeros_like(md), md])
      else:
        d, md = m.apply({"params": params}, x.astype(m.dtype), tt, text.astype(m.dtype), images,
                        conditioning_scale=scale * keep, guess_mode=unit.guess_mode)
    down = d if down is None else [p + q for p, q in zip(down, d)]
    mid = md if mid is None else mid + md
  return {} if down is None else dict(down_residuals=down, mid_residual=mid)
