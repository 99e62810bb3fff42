"""Timestep embedding (SD) and the sinusoidal positional encoding of the motion module."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import flax.linen as nn


def timestep_features(t, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0):
  """Sinusoidal features of timesteps t (any shape) -> t.shape + (dim,), f32.

  SD1.5 uses flip_sin_to_cos=True (cos first) and freq_shift=0, as diffusers' `Timesteps`.
  """
  half = dim // 2
  exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(t, jnp.float32)[..., None] * jnp.exp(exponent)
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding`)."""
  dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
    x = nn.silu(x)
    return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(x)


def motion_positional_encoding(max_len: int, dim: int) -> np.ndarray:
  """The motion module's fixed `pe` buffer, (1, max_len, dim): sin on even, cos on odd channels.

  Computed in f32 exactly like the official `PositionalEncoding` (never trained).
  """
  position = np.arange(max_len, dtype=np.float32)[:, None]
  div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
  pe = np.zeros((1, max_len, dim), np.float32)
  pe[0, :, 0::2] = np.sin(position * div_term)
  pe[0, :, 1::2] = np.cos(position * div_term)
  return pe
