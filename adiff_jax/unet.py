"""The SD1.5 UNet inflated for video, with AnimateDiff motion modules (official UNet3DConditionModel).

Video latents are channels-last (B, F, H, W, C). Spatial layers (ResNet blocks, spatial
transformers, resampling) work per frame; motion modules mix across frames.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from adiff_jax.embeddings import TimestepEmbedding, timestep_features
from adiff_jax.free_noise import FreeNoiseConfig
from adiff_jax.layers import Conv2d, GroupNorm
from adiff_jax.motion_module import MotionModule, MotionModuleConfig
from adiff_jax.resnet import Downsample, ResnetBlock, Upsample
from adiff_jax.sharding import DATA, FRAMES, constrain
from adiff_jax.transformer import SpatialTransformer
from adiff_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The image UNet (diffusers `UNet2DConditionModel` fields, SD1.5 defaults).

  cross_attention_levels[i]: whether down level i (and the mirrored up level) has spatial
  transformers (CrossAttn*Block) or only ResNets (DownBlock/UpBlock).
  attention_heads: heads of the spatial transformers per level (diffusers' confusingly named
  `attention_head_dim=8` in SD1.5 is this head count).
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  cross_attention_levels: tuple[bool, ...] = (True, True, True, False)
  layers_per_block: int = 2
  attention_heads: int | tuple[int, ...] = 8
  cross_attention_dim: int = 768
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  transformer_depth: int = 1
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0

  def __post_init__(self):
    if len(self.cross_attention_levels) != len(self.block_out_channels):
      raise InputError("cross_attention_levels needs one entry per block_out_channels level")

  @classmethod
  def sd15(cls) -> "UNetConfig":
    return cls()

  @classmethod
  def tiny(cls, **kw) -> "UNetConfig":
    """Two levels, 32/64 channels: for tests and the CPU demo."""
    base = dict(block_out_channels=(32, 64), cross_attention_levels=(True, False),
                layers_per_block=2, attention_heads=2, cross_attention_dim=32, norm_num_groups=8)
    return cls(**{**base, **kw})

  @property
  def heads(self) -> tuple[int, ...]:
    h = self.attention_heads
    return (h,) * len(self.block_out_channels) if isinstance(h, int) else tuple(h)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
  """What one UNet block needs to build its layers (shared by down, mid and up blocks)."""
  config: UNetConfig
  motion: Optional[MotionModuleConfig]
  attention_impl: Optional[str]
  remat: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  free_noise: Optional[FreeNoiseConfig] = None

  @property
  def kw(self):
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def _wrap(self, cls):
    return nn.remat(cls) if self.remat else cls

  def resnet(self, out, name):
    cfg = self.config
    across = self.motion is not None and not self.motion.inflated_groupnorm
    return self._wrap(ResnetBlock)(out, cfg.norm_num_groups, cfg.norm_eps, across, name=name,
                                   **self.kw)

  def spatial(self, heads, name):
    cfg = self.config
    return self._wrap(SpatialTransformer)(heads, cfg.transformer_depth, cfg.norm_num_groups,
                                          cfg.use_linear_projection, self.attention_impl,
                                          name=name, **self.kw)

  def motion_module(self, name):
    return self._wrap(MotionModule)(self.motion, self.attention_impl, name=name,
                                    free_noise=self.free_noise, **self.kw)


class DownBlock(nn.Module):
  """(resnet [-> spatial transformer] [-> motion module]) x layers, then downsampler.

  Returns the output and the skip features of every layer (and of the downsampler).
  """
  spec: _BlockSpec
  out_channels: int
  heads: Optional[int]       # None: no spatial transformers (DownBlock2D)
  motion: bool
  downsample: bool

  @nn.compact
  def __call__(self, x, temb, context):
    skips = []
    for j in range(self.spec.config.layers_per_block):
      x = self.spec.resnet(self.out_channels, f"resnets_{j}")(x, temb)
      if self.heads is not None:
        x = self.spec.spatial(self.heads, f"attentions_{j}")(x, context)
      if self.motion:
        x = self.spec.motion_module(f"motion_modules_{j}")(x)
      skips.append(x)
    if self.downsample:
      x = Downsample(self.out_channels, name="downsamplers_0", **self.spec.kw)(x)
      skips.append(x)
    return x, skips


class MidBlock(nn.Module):
  """resnet -> spatial transformer [-> motion module (v2)] -> resnet."""
  spec: _BlockSpec
  channels: int
  heads: int
  motion: bool

  @nn.compact
  def __call__(self, x, temb, context):
    x = self.spec.resnet(self.channels, "resnets_0")(x, temb)
    x = self.spec.spatial(self.heads, "attentions_0")(x, context)
    if self.motion:
      x = self.spec.motion_module("motion_modules_0")(x)
    return self.spec.resnet(self.channels, "resnets_1")(x, temb)


class UpBlock(nn.Module):
  """(concat skip -> resnet [-> spatial transformer] [-> motion module]) x (layers+1), upsampler."""
  spec: _BlockSpec
  out_channels: int
  heads: Optional[int]
  motion: bool
  upsample: bool

  @nn.compact
  def __call__(self, x, skips, temb, context):
    for k, skip in enumerate(skips):
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)  # hidden first, then skip
      x = self.spec.resnet(self.out_channels, f"resnets_{k}")(x, temb)
      if self.heads is not None:
        x = self.spec.spatial(self.heads, f"attentions_{k}")(x, context)
      if self.motion:
        x = self.spec.motion_module(f"motion_modules_{k}")(x)
    if self.upsample:
      x = Upsample(self.out_channels, name="upsamplers_0", **self.spec.kw)(x)
    return x


class UNet3D(nn.Module):
  """Video UNet: (B, F, H, W, Cin) latents, timesteps, text -> (B, F, H, W, Cout) noise prediction.

  motion=None gives the plain image UNet applied per frame (the frozen T2I model).
  dtype is the compute dtype, param_dtype the dtype parameters are created in.
  remat recomputes each layer's activations in the backward pass (training memory).
  free_noise: a `FreeNoiseConfig` runs every motion module's temporal attention on FreeNoise
  windows when the video has more than its context_length frames (`adiff_jax.free_noise`;
  then frames may exceed the positional encoding, windows may not); None: the plain model.
  """
  config: UNetConfig
  motion: Optional[MotionModuleConfig] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: Optional[str] = None
  remat: bool = False
  free_noise: Optional[FreeNoiseConfig] = None

  def check_inputs(self, sample, timesteps, context):
    """Shape checks; they raise while tracing, before anything is compiled."""
    cfg = self.config
    if sample.ndim != 5:
      raise InputError(f"sample must be (B, F, H, W, C) video latents, got shape {sample.shape}")
    b, f, h, w, c = sample.shape
    if c != cfg.in_channels:
      raise InputError(f"sample has {c} channels, the UNet expects {cfg.in_channels} "
                       "(channels-last layout: (B, F, H, W, C))")
    k = cfg.downsample_factor
    if h % k or w % k:
      raise InputError(f"latent size {h}x{w} is not divisible by the UNet's downsampling factor "
                       f"{k} (image size must be a multiple of {8 * k})")
    fn = self.free_noise
    if fn is not None and not isinstance(fn, FreeNoiseConfig):
      raise InputError(f"free_noise must be a FreeNoiseConfig or None, got {type(fn).__name__}")
    if self.motion is not None and fn is not None and f > fn.context_length > self.motion.max_len:
      raise InputError(f"FreeNoise context_length {fn.context_length} exceeds the motion module's "
                       f"positional encoding (at most {self.motion.max_len} frames per window)")
    if self.motion is not None and f > self.motion.max_len and (fn is None or f <= fn.context_length):
      raise InputError(f"{f} frames exceed the motion module's positional encoding "
                       f"(at most {self.motion.max_len} frames)")
    t = jnp.shape(timesteps)
    if t not in ((), (b,), (b, f)):
      raise InputError(f"timesteps must be a scalar, (B,) or (B, F) = ({b}, {f}); got {t}")
    if context.ndim not in (3, 4) or context.shape[0] != b or (
        context.ndim == 4 and context.shape[1] != f):
      raise InputError(f"text context must be (B, L, D) or (B, F, L, D) with B={b}, F={f}; "
                       f"got {context.shape}")
    if context.shape[-1] != cfg.cross_attention_dim:
      raise InputError(f"text context width {context.shape[-1]} != cross_attention_dim "
                       f"{cfg.cross_attention_dim}")

  def check_residuals(self, sample, down_residuals, mid_residual):
    """ControlNet residuals must match the skip features / mid-block output they add to."""
    if down_residuals is None and mid_residual is None:
      return
    if down_residuals is None or mid_residual is None:
      raise InputError("down_residuals and mid_residual come together (a ControlNet's output)")
    cfg = self.config
    b, f, h, w, _ = sample.shape
    chans, n = cfg.block_out_channels, len(cfg.block_out_channels)
    want = [(b, f, h, w, chans[0])]
    for i in range(n):
      s = 2 ** i
      want += [(b, f, h // s, w // s, chans[i])] * cfg.layers_per_block
      if i < n - 1:
        want.append((b, f, h // (2 * s), w // (2 * s), chans[i]))
    got = [tuple(r.shape) for r in down_residuals]
    if got != want:
      raise InputError(f"down_residuals: expected {len(want)} arrays of shapes {want}; got {got}")
    mid = (b, f, h // 2 ** (n - 1), w // 2 ** (n - 1), chans[-1])
    if tuple(mid_residual.shape) != mid:
      raise InputError(f"mid_residual: expected shape {mid}; got {tuple(mid_residual.shape)}")

  @nn.compact
  def __call__(self, sample, timesteps, context, down_residuals=None, mid_residual=None):
    """sample (B, F, H, W, Cin); timesteps scalar, (B,) or (B, F); context (B, L, D) or (B, F, L, D).

    down_residuals / mid_residual (optional, together): a ControlNet's output (e.g.
    `adiff_jax.sparse_ctrl.SparseControlNet`), added to every skip feature after the down
    pass and to the mid block's output, as diffusers' `down_block_additional_residuals` /
    `mid_block_additional_residual`. Without them nothing is added.
    """
    self.check_inputs(sample, timesteps, context)
    self.check_residuals(sample, down_residuals, mid_residual)
    cfg, mm = self.config, self.motion
    spec = _BlockSpec(cfg, mm, self.attention_impl, self.remat, self.dtype, self.param_dtype,
                      self.free_noise)
    kw = spec.kw
    b, f = sample.shape[:2]
    chans, heads = cfg.block_out_channels, cfg.heads
    n = len(chans)
    has_motion = lambda level: mm is not None and 2 ** level in mm.resolutions

    temb = frame_time_embedding(timesteps, b, f, cfg, self.dtype, self.param_dtype)  # (B, F, 4*C0)
    context = context.astype(self.dtype)

    x = constrain(sample.astype(self.dtype), (DATA, FRAMES))
    x = Conv2d(chans[0], name="conv_in", **kw)(x)
    x, skips = down_pass(spec, x, temb, context)
    if down_residuals is not None:
      skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]

    x = MidBlock(spec, chans[-1], heads[-1], mm is not None and mm.mid_block,
                 name="mid_block")(x, temb, context)
    if mid_residual is not None:
      x = x + mid_residual.astype(x.dtype)

    for i in range(n):
      level = n - 1 - i
      take = cfg.layers_per_block + 1
      skips, mine = skips[:-take], skips[-take:][::-1]
      x = UpBlock(spec, chans[level], heads[level] if cfg.cross_attention_levels[level] else None,
                  has_motion(level), upsample=i < n - 1, name=f"up_blocks_{i}")(x, mine, temb, context)

    across = mm is not None and not mm.inflated_groupnorm
    x = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, across, name="conv_norm_out", **kw)(x)
    x = Conv2d(cfg.out_channels, name="conv_out", **kw)(nn.silu(x))
    return constrain(x, (DATA, FRAMES))


def frame_time_embedding(timesteps, b: int, f: int, cfg: UNetConfig, dtype, param_dtype):
  """One time embedding per frame, (B, F, 4*C0), from a scalar, (B,) or (B, F) timesteps.
  Call inside a compact method: the `time_embedding` layer belongs to the caller."""
  t = jnp.asarray(timesteps, jnp.float32)
  t = jnp.broadcast_to(t.reshape(t.shape + (1,) * (2 - t.ndim)), (b, f))
  temb = timestep_features(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
  return TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", dtype=dtype,
                           param_dtype=param_dtype)(temb.astype(dtype))


def down_pass(spec: _BlockSpec, x, temb, context):
  """The down blocks (`down_blocks_<i>`, in the caller) on conv_in's output x: (the lowest
  level's features, every skip feature starting with x), as UNet3D and SparseCtrl use them."""
  cfg, mm = spec.config, spec.motion
  chans, heads = cfg.block_out_channels, cfg.heads
  n = len(chans)
  skips = [x]
  for i in range(n):
    x, s = DownBlock(spec, chans[i], heads[i] if cfg.cross_attention_levels[i] else None,
                     mm is not None and 2 ** i in mm.resolutions, downsample=i < n - 1,
                     name=f"down_blocks_{i}")(x, temb, context)
    skips += s
  return x, skips


def init_params(key: jax.Array, model: UNet3D, frames: int = 2, size: int | None = None):
  """Initialise the UNet's parameters with a small dummy input (shapes do not depend on it)."""
  cfg = model.config
  s = size or cfg.downsample_factor
  sample = jnp.zeros((1, frames, s, s, cfg.in_channels), model.dtype)
  context = jnp.zeros((1, 1, cfg.cross_attention_dim), model.dtype)
  return jax.jit(model.init)(key, sample, jnp.zeros((1,)), context)["params"]
