"""Stable Diffusion 1.5 AutoencoderKL (VAE) in Flax linen, channels-last, plus video helpers.

Parameter tree mirrors diffusers' `AutoencoderKL` state dict (see docs/params.md):

    encoder/{conv_in, down_blocks_i/{resnets_j, downsamplers_0/conv}, mid_block/{resnets_0,
             attentions_0/{group_norm, to_q, to_k, to_v, to_out_0}, resnets_1}, conv_norm_out, conv_out}
    quant_conv, post_quant_conv
    decoder/{conv_in, mid_block/..., up_blocks_i/{resnets_k, upsamplers_0/conv}, conv_norm_out, conv_out}

Latents from `encode` are unscaled (diffusers convention); `scale_latents` / `unscale_latents`
apply `scaling_factor`. `encode_video` / `decode_video` work on (B, F, H, W, C) clips in chunks
of frames and return / take *scaled* latents, which is what the UNet consumes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from adiff_jax.attention import Attention
from adiff_jax.layers import Conv2d, GroupNorm
from adiff_jax.errors import InputError

_EPS = 1e-6  # every GroupNorm in the SD VAE uses eps 1e-6 (not torch's default 1e-5)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215

  @classmethod
  def sd15(cls, **kw) -> "VAEConfig":
    return cls(**kw)

  @classmethod
  def sdxl(cls, **kw) -> "VAEConfig":
    """SDXL's VAE: SD1.5's architecture with retrained weights; latents scaled by 0.13025.
    Its activations overflow fp16 (diffusers' `force_upcast`): decode in f32 (or bf16)."""
    return cls(**{"scaling_factor": 0.13025, **kw})

  @classmethod
  def tiny(cls, **kw) -> "VAEConfig":
    """Test-sized VAE (downsampling factor 2); diffusers accepts the same config."""
    return cls(**{"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8, **kw})

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussian(NamedTuple):
  """Posterior q(z|x) = N(mean, exp(logvar)); arrays (N, h, w, latent_channels). A pytree."""
  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    noise = jax.random.normal(key, self.mean.shape, jnp.float32)
    return (self.mean + self.std * noise).astype(self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) per sample, shape (N,)."""
    m, lv = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(jnp.square(m) + jnp.exp(lv) - 1.0 - lv, axis=(1, 2, 3))


def scale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
  """VAE latents -> diffusion-model latents (unit-ish variance)."""
  return latents * config.scaling_factor


def unscale_latents(latents: jax.Array, config: VAEConfig) -> jax.Array:
  """Diffusion-model latents -> VAE latents, before `decode`."""
  return latents / config.scaling_factor


# ----------------------------------------------------------------------------- building blocks

class _Block(nn.Module):
  """What every VAE block gets from AutoencoderKL: the config and the two dtypes."""
  config: VAEConfig
  dtype: Any            # compute dtype
  param_dtype: Any      # storage dtype of the parameters

  @property
  def kw(self) -> dict:
    """Passed on to child blocks."""
    return dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)

  @property
  def dtypes(self) -> dict:
    """Passed on to layers."""
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class ResnetBlock(_Block):
  """Pre-norm residual block without time embedding (diffusers ResnetBlock2D, temb=None)."""
  features: int

  @nn.compact
  def __call__(self, x):  # (N, H, W, Cin) -> (N, H, W, features)
    cfg = self.config
    norm = functools.partial(GroupNorm, cfg.norm_num_groups, _EPS, **self.dtypes)
    conv = functools.partial(Conv2d, self.features, **self.dtypes)
    h = conv(name="conv1")(nn.silu(norm(name="norm1")(x)))
    h = conv(name="conv2")(nn.silu(norm(name="norm2")(h)))  # dropout is 0 in the SD VAE
    if x.shape[-1] != self.features:
      x = conv(kernel_size=1, padding=0, name="conv_shortcut")(x)
    return (x + h).astype(self.dtype)


class AttentionBlock(_Block):
  """Single-head spatial self-attention with GroupNorm and residual (the VAE mid block's).

  Shares its scope with the project `Attention`, so to_q/to_k/to_v/to_out_0 sit next to
  group_norm exactly as in the diffusers state dict.
  """
  channels: int

  def setup(self):
    cfg = self.config
    self.group_norm = GroupNorm(cfg.norm_num_groups, _EPS, **self.dtypes)
    self.attn = Attention(heads=1, dim_head=self.channels, qkv_bias=True, **self.dtypes)
    nn.share_scope(self, self.attn)

  def __call__(self, x):  # (N, H, W, C)
    n, h, w, c = x.shape
    y = self.group_norm(x).reshape(n, h * w, c)  # pixels are the sequence
    y = self.attn(y).reshape(n, h, w, c)
    return (x + y).astype(self.dtype)


class MidBlock(_Block):

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(features=c, **self.kw, name="resnets_0")(x)
    x = AttentionBlock(channels=c, **self.kw, name="attentions_0")(x)
    return ResnetBlock(features=c, **self.kw, name="resnets_1")(x)


class Downsample(_Block):

  @nn.compact
  def __call__(self, x):  # (N, H, W, C) -> (N, H/2, W/2, C)
    # SD's encoder pads only bottom/right (torch F.pad (0, 1, 0, 1)), then a valid stride-2 conv.
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    cfg = self.config
    return Conv2d(x.shape[-1], 3, stride=2, padding=0, **self.dtypes,
                  name="conv")(x)


class Upsample(_Block):

  @nn.compact
  def __call__(self, x):  # (N, H, W, C) -> (N, 2H, 2W, C)
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
    cfg = self.config
    return Conv2d(x.shape[-1], **self.dtypes, name="conv")(x)


class DownBlock(_Block):
  """DownEncoderBlock2D: resnets, then a stride-2 downsampler unless it is the last block."""
  features: int
  add_downsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.config.layers_per_block):
      x = ResnetBlock(features=self.features, **self.kw, name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = Downsample(**self.kw, name="downsamplers_0")(x)
    return x


class UpBlock(_Block):
  """UpDecoderBlock2D: layers_per_block + 1 resnets, then a x2 upsampler unless last."""
  features: int
  add_upsample: bool

  @nn.compact
  def __call__(self, x):
    for j in range(self.config.layers_per_block + 1):
      x = ResnetBlock(features=self.features, **self.kw, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = Upsample(**self.kw, name="upsamplers_0")(x)
    return x


class Encoder(_Block):

  @nn.compact
  def __call__(self, x):  # (N, H, W, in_channels) -> (N, H/f, W/f, 2 * latent_channels)
    cfg = self.config
    conv = functools.partial(Conv2d, **self.dtypes)
    chans = cfg.block_out_channels
    x = conv(chans[0], name="conv_in")(x)
    for i, ch in enumerate(chans):
      x = DownBlock(features=ch, add_downsample=i < len(chans) - 1, **self.kw, name=f"down_blocks_{i}")(x)
    x = MidBlock(**self.kw, name="mid_block")(x)  # (N, H/f, W/f, chans[-1])
    x = nn.silu(GroupNorm(cfg.norm_num_groups, _EPS, **self.dtypes,
                          name="conv_norm_out")(x))
    return conv(2 * cfg.latent_channels, name="conv_out")(x)  # mean and logvar stacked


class Decoder(_Block):

  @nn.compact
  def __call__(self, z):  # (N, h, w, latent_channels) -> (N, h*f, w*f, out_channels)
    cfg = self.config
    conv = functools.partial(Conv2d, **self.dtypes)
    chans = tuple(reversed(cfg.block_out_channels))  # up blocks run widest first
    x = conv(chans[0], name="conv_in")(z)
    x = MidBlock(**self.kw, name="mid_block")(x)
    for i, ch in enumerate(chans):
      x = UpBlock(features=ch, add_upsample=i < len(chans) - 1, **self.kw, name=f"up_blocks_{i}")(x)
    x = nn.silu(GroupNorm(cfg.norm_num_groups, _EPS, **self.dtypes,
                          name="conv_norm_out")(x))
    return conv(cfg.out_channels, name="conv_out")(x)


# ----------------------------------------------------------------------------- the model

def _check(x, rank: int, channels: int, what: str, divisor: int = 1):
  if x.ndim != rank:
    raise InputError(f"{what}: expected rank {rank} (channels last), got shape {x.shape}")
  if x.shape[-1] != channels:
    raise InputError(f"{what}: expected {channels} channels in the last axis, got shape {x.shape}")
  h, w = x.shape[-3:-1]
  if h % divisor or w % divisor:
    raise InputError(f"{what}: height and width must be divisible by {divisor}, got {h}x{w}")


class AutoencoderKL(nn.Module):
  """SD VAE. `init(key, images)` / `apply(params, images, key)` run a full reconstruction;
  `apply(params, x, method="encode")` and `apply(params, z, method="decode")` the halves.
  dtype is the compute dtype, param_dtype the dtype parameters are created in (as UNet3D and
  CLIPTextModel take them)."""
  config: VAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(Conv2d, kernel_size=1, padding=0, dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(**kw)
    self.decoder = Decoder(**kw)
    self.quant_conv = conv(2 * cfg.latent_channels)
    self.post_quant_conv = conv(cfg.latent_channels)

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """images (N, H, W, in_channels) in [-1, 1] -> posterior over unscaled latents (N, H/f, W/f, 4)."""
    cfg = self.config
    _check(images, 4, cfg.in_channels, "encode", cfg.downsample_factor)
    moments = self.quant_conv(self.encoder(images))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))  # clip as diffusers: avoids inf std

  def decode(self, latents: jax.Array) -> jax.Array:
    """Unscaled latents (N, h, w, latent_channels) -> images (N, h*f, w*f, out_channels), ~[-1, 1]."""
    _check(latents, 4, self.config.latent_channels, "decode")
    return self.decoder(self.post_quant_conv(latents))

  def __call__(self, images: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
    posterior = self.encode(images)
    z = posterior.mode() if key is None else posterior.sample(key)
    return self.decode(z)


# ----------------------------------------------------------------------------- video helpers

def _chunked(fn, xs, chunk_size: int):
  """Apply `fn` to (n, ...) arrays in `xs` (a tuple) chunk by chunk via `lax.map`.

  The frame axis is zero-padded to a multiple of `chunk_size` so every chunk has the same
  shape (one compile); padded outputs are dropped. Frames are independent (GroupNorm statistics
  are per image), so padding cannot change the real frames.
  """
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise InputError(f"chunk_size must be a positive int, got {chunk_size!r}")
  n = xs[0].shape[0]
  chunk_size = min(chunk_size, n)
  pad = -n % chunk_size
  xs = tuple(jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) for x in xs)
  xs = tuple(x.reshape((-1, chunk_size) + x.shape[1:]) for x in xs)  # (chunks, chunk, ...)
  ys = jax.lax.map(lambda c: fn(*c), xs)
  return ys.reshape((-1,) + ys.shape[2:])[:n]


@functools.partial(jax.jit, static_argnames=("model", "chunk_size"))
def _encode_frames(model, params, frames, noise, chunk_size):
  def enc(x, eps):
    post = model.apply(params, x, method=AutoencoderKL.encode)
    z = post.mean if eps is None else (post.mean + post.std * eps).astype(post.mean.dtype)
    return scale_latents(z, model.config)
  if noise is None:
    return _chunked(lambda x: enc(x, None), (frames,), chunk_size)
  return _chunked(enc, (frames, noise), chunk_size)


@functools.partial(jax.jit, static_argnames=("model", "chunk_size"))
def _decode_frames(model, params, latents, chunk_size):
  dec = lambda z: model.apply(params, unscale_latents(z, model.config), method=AutoencoderKL.decode)
  return _chunked(dec, (latents,), chunk_size)


def encode_video(model: AutoencoderKL, params, video: jax.Array, key: Optional[jax.Array] = None,
                 chunk_size: int = 8) -> jax.Array:
  """video (B, F, H, W, in_channels) in [-1, 1] -> *scaled* latents (B, F, H/f, W/f, latent_channels).

  Posterior mode if `key` is None, a sample otherwise. The noise is drawn for the whole clip at
  once (latent-sized, cheap), so a sample does not depend on `chunk_size`. At most `chunk_size`
  frames go through the encoder at a time.
  """
  cfg = model.config
  _check(video, 5, cfg.in_channels, "encode_video", cfg.downsample_factor)
  b, f, h, w, _ = video.shape
  frames = video.reshape((b * f,) + video.shape[2:])  # (B*F, H, W, C)
  noise = None
  if key is not None:
    d = cfg.downsample_factor
    noise = jax.random.normal(key, (b * f, h // d, w // d, cfg.latent_channels), jnp.float32)
  z = _encode_frames(model, params, frames, noise, chunk_size)
  return z.reshape((b, f) + z.shape[1:])


def decode_video(model: AutoencoderKL, params, latents: jax.Array, chunk_size: int = 8) -> jax.Array:
  """*Scaled* latents (B, F, h, w, latent_channels) -> frames (B, F, h*f, w*f, out_channels).

  Divides by `scaling_factor` first; at most `chunk_size` frames go through the decoder at a time.
  """
  _check(latents, 5, model.config.latent_channels, "decode_video")
  b, f = latents.shape[:2]
  x = _decode_frames(model, params, latents.reshape((b * f,) + latents.shape[2:]), chunk_size)
  return x.reshape((b, f) + x.shape[1:])
