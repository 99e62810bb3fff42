"""Small shared layers: GroupNorm with per-frame / across-frame statistics, PyTorch-style conv,
Dense with an optional unmerged LoRA (see adiff_jax/lora.py)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
from adiff_jax.errors import InputError


class GroupNorm(nn.Module):
  """GroupNorm over channels-last input, statistics in f32 (parameters `scale`, `bias`).

  Input (N, *spatial, C): statistics per sample over spatial axes and the channels of a group.
  Input (B, F, H, W, C) is video: per frame by default (frames are samples, as in the official
  `InflatedGroupNorm` and in every spatial-transformer / motion-module norm); with
  `across_frames=True` statistics pool over F, H, W, as PyTorch's GroupNorm on a (b, c, f, h, w)
  tensor does in the v1 base UNet (`use_inflated_groupnorm: false`).
  """
  num_groups: int
  epsilon: float = 1e-5
  across_frames: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise InputError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    first = 2 if (x.ndim == 5 and not self.across_frames) else 1
    xg = x.astype(jnp.float32).reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
    axes = tuple(range(first, xg.ndim - 2)) + (xg.ndim - 1,)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class Conv2d(nn.Module):
  """2-D convolution with PyTorch padding semantics (parameters `kernel` (kh, kw, in, out), `bias`).

  Any leading dims are folded into the batch, so video (B, F, H, W, C) is convolved per frame
  (the official `InflatedConv3d`).
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    lead = x.shape[:-3]
    x = x.reshape((-1,) + x.shape[-3:]).astype(self.dtype)  # (N, H, W, C)
    y = _conv(x, kernel.astype(self.dtype), self.stride, self.padding)
    y = (y + bias.astype(jnp.float32)).astype(self.dtype)
    return y.reshape(lead + y.shape[1:])


# XLA:CPU's convolution is ~100x slower than a matmul when the image is tiny and the channels
# many (SD's 2x2 and 4x4 levels with 1280 channels): there we unfold patches (im2col) instead.
_CPU_IM2COL_MAX_PIXELS = 64


def _conv(x, kernel, stride: int, padding: int):
  """x (N, H, W, C), kernel (kh, kw, C, O) -> (N, Ho, Wo, O) in f32."""
  kh, kw, c, o = kernel.shape
  if kh == kw == 1 and stride == 1 and padding == 0:  # a 1x1 conv is a matmul
    return jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0], preferred_element_type=jnp.float32)
  n, h, w, _ = x.shape
  ho = (h + 2 * padding - kh) // stride + 1
  wo = (w + 2 * padding - kw) // stride + 1
  if jax.default_backend() == "cpu" and ho * wo <= _CPU_IM2COL_MAX_PIXELS:
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cols = jnp.concatenate([
        xp[:, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
        for dy in range(kh) for dx in range(kw)], axis=-1)          # (N, Ho, Wo, kh*kw*C)
    return jnp.einsum("nhwk,ko->nhwo", cols, kernel.reshape(kh * kw * c, o),
                      preferred_element_type=jnp.float32)
  p = padding
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((p, p), (p, p)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)


class LoRADense(nn.Module):
  """nn.Dense (parameters `kernel` (in, out), `bias`) plus an optional LoRA from the "lora" collection."""
  features: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.has_variable("lora", "down"):
      down = self.get_variable("lora", "down").astype(self.dtype)
      up = self.get_variable("lora", "up").astype(self.dtype)
      scale = self.get_variable("lora", "scale").astype(self.dtype)
      if down.shape[0] != x.shape[-1] or up.shape[1] != self.features:
        raise InputError(f"LoRA at {'/'.join(self.scope.path)}: down {down.shape} / up {up.shape} "
                         f"do not fit a layer {x.shape[-1]} -> {self.features}")
      y = y + jnp.dot(jnp.dot(x.astype(self.dtype), down) * scale, up)
    return y
