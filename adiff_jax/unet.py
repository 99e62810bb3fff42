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
  `attention_head_dim=8` in SD1.5 is this head count; SDXL: channels / 64 = (5, 10, 20)).
  transformer_depth: transformer blocks per spatial transformer, one int or one per level
    (diffusers `transformer_layers_per_block`; up levels mirror down levels, the mid block
    takes the last level's depth).
  addition_embed_type: None (SD1.x) or "text_time" (SDXL): the UNet takes `added_cond`
    {"text_embeds": (B, D), "time_ids": (B, K)}; time_ids are sinusoid-embedded with
    `addition_time_embed_dim` each, concatenated after text_embeds
    (`projection_class_embeddings_input_dim` = D + K * addition_time_embed_dim) and passed
    through `add_embedding` (linear_1, SiLU, linear_2) into the time embedding.
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
  transformer_depth: int | tuple[int, ...] = 1
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  addition_embed_type: Optional[str] = None
  addition_time_embed_dim: int = 256
  projection_class_embeddings_input_dim: int = 2816

  def __post_init__(self):
    if len(self.cross_attention_levels) != len(self.block_out_channels):
      raise InputError("cross_attention_levels needs one entry per block_out_channels level")
    d = self.transformer_depth
    if not isinstance(d, int) and len(d) != len(self.block_out_channels):
      raise InputError("transformer_depth: one int or one entry per block_out_channels level")
    if any(n < 1 for n, c in zip(self.depths, self.cross_attention_levels) if c) or self.depths[-1] < 1:
      raise InputError(f"transformer_depth {d}: levels with spatial transformers (and the mid "
                       "block, which takes the last level's) need at least one block")
    if self.addition_embed_type not in (None, "text_time"):
      raise InputError(f"addition_embed_type {self.addition_embed_type!r}: only None or "
                       "'text_time' (SDXL) are supported")

  @classmethod
  def sd15(cls) -> "UNetConfig":
    return cls()

  @classmethod
  def sdxl(cls, **kw) -> "UNetConfig":
    """SDXL base: 320/640/1280, no transformers at level 0, depth 2 and 10 (mid 10), linear
    proj_in/out, head dim 64, 2048-wide text, pooled text (1280) + 6 time ids added."""
    base = dict(block_out_channels=(320, 640, 1280), cross_attention_levels=(False, True, True),
                attention_heads=(5, 10, 20), cross_attention_dim=2048, transformer_depth=(1, 2, 10),
                use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    return cls(**{**base, **kw})

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
  def depths(self) -> tuple[int, ...]:
    d = self.transformer_depth
    return (d,) * len(self.block_out_channels) if isinstance(d, int) else tuple(d)

  @property
  def added_cond_shapes(self) -> Optional[dict]:
    """{"text_embeds": D, "time_ids": K} widths of `added_cond` (None without an added embedding).
    K = 6 for SDXL; the text width is what the projection leaves."""
    if self.addition_embed_type is None:
      return None
    k = 6
    return {"text_embeds": self.projection_class_embeddings_input_dim - k * self.addition_time_embed_dim,
            "time_ids": k}

  def dummy_added_cond(self, batch: int = 1, dtype=jnp.float32) -> Optional[dict]:
    """Zeros of the `added_cond` shapes (None without an added embedding): for init/eval_shape."""
    w = self.added_cond_shapes
    return None if w is None else {k: jnp.zeros((batch, n), dtype) for k, n in w.items()}

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

  def spatial(self, heads, name, depth=None):
    cfg = self.config
    depth = cfg.depths[-1] if depth is None else depth
    return self._wrap(SpatialTransformer)(heads, depth, cfg.norm_num_groups,
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
  depth: Optional[int] = None  # transformer blocks per spatial transformer (None: the last level's)

  @nn.compact
  def __call__(self, x, temb, context):
    skips = []
    for j in range(self.spec.config.layers_per_block):
      x = self.spec.resnet(self.out_channels, f"resnets_{j}")(x, temb)
      if self.heads is not None:
        x = self.spec.spatial(self.heads, f"attentions_{j}", self.depth)(x, context)
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
  depth: Optional[int] = None  # None: the last level's transformer depth (diffusers)

  @nn.compact
  def __call__(self, x, temb, context):
    x = self.spec.resnet(self.channels, "resnets_0")(x, temb)
    x = self.spec.spatial(self.heads, "attentions_0", self.depth)(x, context)
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
  depth: Optional[int] = None

  @nn.compact
  def __call__(self, x, skips, temb, context):
    for k, skip in enumerate(skips):
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)  # hidden first, then skip
      x = self.spec.resnet(self.out_channels, f"resnets_{k}")(x, temb)
      if self.heads is not None:
        x = self.spec.spatial(self.heads, f"attentions_{k}", self.depth)(x, context)
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

  def check_added_cond(self, sample, added_cond):
    """SDXL's added conditions: required by a `text_time` UNet, refused by any other."""
    want = self.config.added_cond_shapes
    if want is None:
      if added_cond is not None:
        raise InputError("added_cond given, but this UNet has no added embedding "
                         "(UNetConfig.addition_embed_type is None)")
      return
    if not isinstance(added_cond, dict) or set(added_cond) != set(want):
      raise InputError(f"this UNet (addition_embed_type {self.config.addition_embed_type!r}) needs "
                       f"added_cond={{'text_embeds': (B, {want['text_embeds']}), 'time_ids': (B, "
                       f"{want['time_ids']})}}; got "
                       f"{sorted(added_cond) if isinstance(added_cond, dict) else added_cond!r}")
    b = sample.shape[0]
    for k, n in want.items():
      got = tuple(jnp.shape(added_cond[k]))
      if got != (b, n):
        raise InputError(f"added_cond[{k!r}] must have shape ({b}, {n}); got {got}")

  @nn.compact
  def __call__(self, sample, timesteps, context, down_residuals=None, mid_residual=None,
               added_cond=None):
    """sample (B, F, H, W, Cin); timesteps scalar, (B,) or (B, F); context (B, L, D) or (B, F, L, D).

    added_cond (SDXL, `addition_embed_type="text_time"`, required there and only there):
    {"text_embeds": (B, 1280) pooled text, "time_ids": (B, 6) original size, crop, target size},
    one per video, added to every frame's time embedding.

    down_residuals / mid_residual (optional, together): a ControlNet's output (e.g.
    `adiff_jax.sparse_ctrl.SparseControlNet`), added to every skip feature after the down
    pass and to the mid block's output, as diffusers' `down_block_additional_residuals` /
    `mid_block_additional_residual`. Without them nothing is added.
    """
    self.check_inputs(sample, timesteps, context)
    self.check_residuals(sample, down_residuals, mid_residual)
    self.check_added_cond(sample, added_cond)
    cfg, mm = self.config, self.motion
    spec = _BlockSpec(cfg, mm, self.attention_impl, self.remat, self.dtype, self.param_dtype,
                      self.free_noise)
    kw = spec.kw
    b, f = sample.shape[:2]
    chans, heads = cfg.block_out_channels, cfg.heads
    n = len(chans)
    has_motion = lambda level: mm is not None and 2 ** level in mm.resolutions

    temb = frame_time_embedding(timesteps, b, f, cfg, self.dtype, self.param_dtype)  # (B, F, 4*C0)
    if added_cond is not None:
      temb = temb + added_embedding(added_cond, cfg, self.dtype, self.param_dtype)[:, None]
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
                  has_motion(level), upsample=i < n - 1, depth=cfg.depths[level],
                  name=f"up_blocks_{i}")(x, mine, temb, context)

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


def added_embedding(added_cond: dict, cfg: UNetConfig, dtype, param_dtype):
  """SDXL's `text_time` embedding, (B, 4*C0): [text_embeds, sinusoid(time_ids)] -> add_embedding.
  Call inside a compact method: the `add_embedding` layer belongs to the caller."""
  ids = jnp.asarray(added_cond["time_ids"], jnp.float32)
  t = timestep_features(ids, cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
  t = t.reshape(ids.shape[0], -1)                                   # (B, K * dim)
  x = jnp.concatenate([jnp.asarray(added_cond["text_embeds"], jnp.float32), t], axis=-1)
  return TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", dtype=dtype,
                           param_dtype=param_dtype)(x.astype(dtype))


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
                     depth=cfg.depths[i], name=f"down_blocks_{i}")(x, temb, context)
    skips += s
  return x, skips


def init_params(key: jax.Array, model: UNet3D, frames: int = 2, size: int | None = None):
  """Initialise the UNet's parameters with a small dummy input (shapes do not depend on it)."""
  cfg = model.config
  s = size or cfg.downsample_factor
  sample = jnp.zeros((1, frames, s, s, cfg.in_channels), model.dtype)
  context = jnp.zeros((1, 1, cfg.cross_attention_dim), model.dtype)
  return jax.jit(model.init)(key, sample, jnp.zeros((1,)), context,
                             added_cond=cfg.dummy_added_cond())["params"]
