"""Spatial transformer of the SD UNet (diffusers `Transformer2DModel`), applied per frame."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from adiff_jax.attention import Attention
from adiff_jax.layers import Conv2d, GroupNorm


def layer_norm(name: str, dtype, param_dtype, eps: float = 1e-5) -> nn.LayerNorm:
  # Two-pass variance: the fast E[x^2]-E[x]^2 form drifts from PyTorch by ~1e-4.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
                      name=name)


class GEGLU(nn.Module):
  """proj (C -> 2*inner) split into value || gate; value * GELU(gate) with exact GELU."""
  inner: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(2 * self.inner, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """GEGLU feed-forward: net_0 (GEGLU, C -> mult*C) then net_2 (mult*C -> C)."""
  mult: int = 4
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(self.mult * c, name="net_0", **kw)(x)
    return nn.Dense(c, name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
  """norm1 -> attn1 (self) -> norm2 -> attn2 (cross to text) -> norm3 -> ff, each residual.

  x (B, F, N, C); context (B, L, D) shared by all frames or (B, F, L, D) per frame.
  """
  heads: int
  dim_head: int
  attention_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    b, f, n, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = lambda name: Attention(self.heads, self.dim_head, attention_impl=self.attention_impl,
                                  name=name, **kw)
    h = layer_norm("norm1", **kw)(x).reshape(b * f, n, c)           # frames as batch
    x = x + attn("attn1")(h).reshape(b, f, n, c)
    h = layer_norm("norm2", **kw)(x)
    if context.ndim == 3:  # one text per video: every frame's queries attend to the same keys
      h = attn("attn2")(h.reshape(b, f * n, c), context).reshape(b, f, n, c)
    else:                  # per-frame text (B, F, L, D)
      h = attn("attn2")(h.reshape(b * f, n, c), context.reshape((b * f,) + context.shape[2:]))
      h = h.reshape(b, f, n, c)
    x = x + h
    return x + FeedForward(name="ff", **kw)(layer_norm("norm3", **kw)(x))


class SpatialTransformer(nn.Module):
  """GroupNorm -> proj_in -> transformer blocks -> proj_out -> residual; (B, F, H, W, C) in/out."""
  heads: int
  depth: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  attention_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    b, f, hh, ww, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = (lambda name: nn.Dense(c, name=name, **kw)) if self.use_linear_projection else (
        lambda name: Conv2d(c, kernel_size=1, padding=0, name=name, **kw))
    h = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
    h = proj("proj_in")(h).reshape(b, f, hh * ww, c)                # (B, F, N, C)
    for i in range(self.depth):
      h = BasicTransformerBlock(self.heads, c // self.heads, self.attention_impl,
                                name=f"transformer_blocks_{i}", **kw)(h, context)
    h = proj("proj_out")(h.reshape(b, f, hh, ww, c))
    return h + x.astype(self.dtype)
