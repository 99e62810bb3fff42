"""ResNet block and resampling layers of the SD UNet, applied per frame to (B, F, H, W, C)."""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import flax.linen as nn

from adiff_jax.layers import Conv2d, GroupNorm


class ResnetBlock(nn.Module):
  """diffusers `ResnetBlock2D` (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut).

  x (B, F, H, W, Cin), temb (B, F, Ct) -> (B, F, H, W, out_channels).
  `groupnorm_across_frames` reproduces v1's non-inflated GroupNorm (stats over F, H, W).
  """
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  groupnorm_across_frames: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb: Optional[jnp.ndarray]):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: GroupNorm(self.groups, self.eps, self.groupnorm_across_frames, name=name, **kw)
    h = Conv2d(self.out_channels, name="conv1", **kw)(nn.silu(norm("norm1")(x)))
    if temb is not None:
      t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, :, None, None, :]  # (B, F, 1, 1, C)
    h = Conv2d(self.out_channels, name="conv2", **kw)(nn.silu(norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = Conv2d(self.out_channels, kernel_size=1, padding=0, name="conv_shortcut", **kw)(x)
    return x.astype(self.dtype) + h


class Downsample(nn.Module):
  """3x3 conv with stride 2 (padding 1): (…, H, W, C) -> (…, H/2, W/2, C)."""
  channels: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return Conv2d(self.channels, stride=2, name="conv", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x then 3x3 conv: (…, H, W, C) -> (…, 2H, 2W, C)."""
  channels: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
    return Conv2d(self.channels, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
