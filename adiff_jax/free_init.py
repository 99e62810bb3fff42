"""FreeInit (Wu et al. 2023): re-noise the low spatio-temporal frequencies of a finished sample.

Sampling runs `iterations` times. After each run, the denoised latents are diffused back to
t = T-1 with the *initial* noise, and their low-frequency part (a 3-D low-pass filter over frames,
height and width) is kept while the high frequencies come from fresh noise; the next run starts
from that mix. Filters and the mix follow diffusers' `free_init_utils.py` (which equals the
official `freeinit_utils.py`); defaults are diffusers' (3 iterations, Butterworth of order 4,
d_s = d_t = 0.25). The official code also defaults to 5 iterations.

Latents here are channels-last (B, F, h, w, C); the FFT runs over axes (F, h, w).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from adiff_jax.errors import InputError
from adiff_jax.schedulers import NoiseSchedule, add_noise

FILTERS = ("butterworth", "gaussian", "ideal")


@dataclasses.dataclass(frozen=True)
class FreeInitConfig:
  iterations: int = 3
  method: str = "butterworth"
  order: int = 4                       # Butterworth order
  spatial_stop_frequency: float = 0.25   # d_s
  temporal_stop_frequency: float = 0.25  # d_t
  fast_sampling: bool = False          # coarse-to-fine: iteration i runs steps * (i + 1) / iterations

  def __post_init__(self):
    if self.iterations < 1:
      raise InputError(f"FreeInit iterations must be >= 1, got {self.iterations}")
    if self.method not in FILTERS:
      raise InputError(f"unknown FreeInit filter {self.method!r}; expected one of {FILTERS}")
    if self.order < 1:
      raise InputError(f"FreeInit Butterworth order must be >= 1, got {self.order}")
    for name in ("spatial_stop_frequency", "temporal_stop_frequency"):
      v = getattr(self, name)
      if not 0.0 <= v <= 1.0:
        raise InputError(f"FreeInit {name} must be in [0, 1], got {v}")


def lowpass_filter(frames: int, height: int, width: int, cfg: FreeInitConfig) -> np.ndarray:
  """The low-pass mask (F, h, w) in fftshift-ed frequency order (float32)."""
  ds, dt = cfg.spatial_stop_frequency, cfg.temporal_stop_frequency
  if ds == 0 or dt == 0:
    return np.zeros((frames, height, width), np.float32)
  t = (2.0 * np.arange(frames) / frames - 1.0) * (ds / dt)
  h = 2.0 * np.arange(height) / height - 1.0
  w = 2.0 * np.arange(width) / width - 1.0
  d2 = t[:, None, None] ** 2 + h[None, :, None] ** 2 + w[None, None, :] ** 2
  if cfg.method == "butterworth":
    mask = 1.0 / (1.0 + (d2 / ds ** 2) ** cfg.order)
  elif cfg.method == "gaussian":
    mask = np.exp(-d2 / (2.0 * ds ** 2))
  else:  # "ideal" (the official "box"): note d^2 is compared with 2 d_s, as both codebases do
    mask = (d2 <= ds * 2).astype(np.float64)
  return mask.astype(np.float32)


def mix(z, noise, lpf):
  """Low frequencies of z, high frequencies of noise; z, noise (B, F, h, w, C), lpf (F, h, w)."""
  axes = (1, 2, 3)
  fz = jnp.fft.fftshift(jnp.fft.fftn(z.astype(jnp.float32), axes=axes), axes=axes)
  fn = jnp.fft.fftshift(jnp.fft.fftn(noise.astype(jnp.float32), axes=axes), axes=axes)
  m = jnp.asarray(lpf)[None, :, :, :, None]
  mixed = fz * m + fn * (1.0 - m)
  return jnp.fft.ifftn(jnp.fft.ifftshift(mixed, axes=axes), axes=axes).real


def reinit(latents, initial_noise, fresh_noise, schedule: NoiseSchedule, cfg: FreeInitConfig):
  """The next iteration's starting latents from the last one's result (all (B, F, h, w, C))."""
  t = jnp.full((latents.shape[0],), schedule.num_train_timesteps - 1, jnp.int32)
  z = add_noise(schedule, latents.astype(jnp.float32), initial_noise.astype(jnp.float32), t)
  lpf = lowpass_filter(*latents.shape[1:4], cfg)
  return mix(z, fresh_noise, lpf).astype(latents.dtype)


def iteration_steps(steps: int, iteration: int, cfg: FreeInitConfig) -> int:
  """Denoising steps of iteration `iteration` (0-based)."""
  if not cfg.fast_sampling:
    return steps
  return max(1, int(steps / cfg.iterations * (iteration + 1)))
