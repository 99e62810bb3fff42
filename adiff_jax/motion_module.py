"""AnimateDiff motion module: the official `VanillaTemporalModule` in Flax.

A motion module sees video features (B, F, H, W, C) and mixes information across frames only:
every spatial location is a sequence of F tokens. It is zero-initialised at its output
(`proj_out`), so inserting it leaves the image model's behaviour unchanged until trained.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import flax.linen as nn

from adiff_jax.attention import Attention
from adiff_jax.errors import InputError
from adiff_jax.embeddings import motion_positional_encoding
from adiff_jax.free_noise import FreeNoiseConfig, fuse_windows, stack_windows
from adiff_jax.layers import GroupNorm
from adiff_jax.params import merge, split
from adiff_jax.sharding import DATA, FRAMES, constrain
from adiff_jax.transformer import FeedForward, layer_norm


@dataclasses.dataclass(frozen=True)
class MotionModuleConfig:
  """Motion-module settings (the official `motion_module_kwargs` / `unet_additional_kwargs`).

  max_len: length of the sinusoidal positional encoding (24 for v1, 32 for v2/v3): the most
    frames the module can see at once.
  mid_block: whether the UNet mid block carries a motion module (v2 only).
  inflated_groupnorm: base-UNet GroupNorm per frame (True, v2/v3) or pooled across frames
    (False, v1 `use_inflated_groupnorm: false`).
  resolutions: which UNet levels (downsampling factors) get motion modules.
  norm_across_frames: the motion module's own GroupNorm per frame (False: official SD1.5 code)
    or pooled over frames, H and W (True: the official SDXL code, which normalises the
    5-D (b, c, f, h, w) tensor; diffusers always pools).
  """
  num_heads: int = 8
  num_transformer_blocks: int = 1
  num_attention_blocks: int = 2     # ("Temporal_Self", "Temporal_Self")
  max_len: int = 32
  norm_groups: int = 32
  ff_mult: int = 4
  zero_init: bool = True
  mid_block: bool = False
  inflated_groupnorm: bool = True
  resolutions: tuple[int, ...] = (1, 2, 4, 8)
  norm_across_frames: bool = False

  @classmethod
  def v1(cls, **kw) -> "MotionModuleConfig":
    """mm_sd_v14 / mm_sd_v15: pe 24, no mid block, GroupNorm across frames in the base UNet."""
    return cls(**{**dict(max_len=24, mid_block=False, inflated_groupnorm=False), **kw})

  @classmethod
  def v2(cls, **kw) -> "MotionModuleConfig":
    """mm_sd_v15_v2: pe 32, mid-block motion module, per-frame GroupNorm."""
    return cls(**{**dict(max_len=32, mid_block=True, inflated_groupnorm=True), **kw})

  @classmethod
  def v3(cls, **kw) -> "MotionModuleConfig":
    """v3_sd15_mm: pe 32, no mid block, per-frame GroupNorm."""
    return cls(**{**dict(max_len=32, mid_block=False, inflated_groupnorm=True), **kw})

  @classmethod
  def sdxl(cls, **kw) -> "MotionModuleConfig":
    """mm_sdxl_v10_beta (official `sdxl` branch): the 3 SDXL levels, no mid block, pe 32,
    per-frame base-UNet GroupNorm, motion-module GroupNorm pooled over frames."""
    return cls(**{**dict(max_len=32, mid_block=False, inflated_groupnorm=True,
                         norm_across_frames=True, resolutions=(1, 2, 4)), **kw})

  @classmethod
  def preset(cls, name: str, **kw) -> "MotionModuleConfig":
    presets = {"v1": cls.v1, "v2": cls.v2, "v3": cls.v3, "sdxl": cls.sdxl}
    if name not in presets:
      raise InputError(f"unknown motion-module preset {name!r}; choose from {sorted(presets)}")
    return presets[name](**kw)


class TemporalTransformerBlock(nn.Module):
  """Temporal self-attentions (each: LayerNorm, + pe, attention, residual), then GEGLU FF.

  x (B, N, F, C): N spatial positions, each a sequence over F frames.
  free_noise (FreeNoise, `adiff_jax.free_noise`), with F > its context_length: the attention
  blocks run on each window of context_length frames (windows stacked as extra rows, positional
  encoding from 0 in each), the windows are fused per frame, then the feed-forward runs once.
  """
  config: MotionModuleConfig
  attention_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  free_noise: Optional[FreeNoiseConfig] = None

  @nn.compact
  def __call__(self, x):
    b, _, f, c = x.shape
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    windowed = self.free_noise is not None and f > self.free_noise.context_length
    h = stack_windows(x, self.free_noise) if windowed else x        # (B, N', F', C)
    _, n2, f2, _ = h.shape
    pe = jnp.asarray(motion_positional_encoding(cfg.max_len, c)[:, :f2], self.dtype)  # (1, F', C)
    for i in range(cfg.num_attention_blocks):
      a = layer_norm(f"norms_{i}", **kw)(h).reshape(b * n2, f2, c) + pe
      a = Attention(cfg.num_heads, c // cfg.num_heads, attention_impl=self.attention_impl,
                    name=f"attention_blocks_{i}", **kw)(a)
      h = h + a.reshape(b, n2, f2, c)
    x = fuse_windows(h, f, self.free_noise) if windowed else h
    return x + FeedForward(cfg.ff_mult, name="ff", **kw)(layer_norm("ff_norm", **kw)(x))


class TemporalTransformer(nn.Module):
  """norm (per-frame GroupNorm) -> proj_in -> blocks -> proj_out -> residual.

  (B, F, H, W, C) -> same. Spatial layers shard frames; here every position needs all its
  frames, so the layout switches to (B, H*W, F, C) sharded over positions instead (an
  all-to-all under a mesh) and back. free_noise: FreeNoise windows in every transformer block.
  """
  config: MotionModuleConfig
  attention_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  free_noise: Optional[FreeNoiseConfig] = None

  @nn.compact
  def __call__(self, x):
    b, f, hh, ww, c = x.shape
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GroupNorm(cfg.norm_groups, 1e-6, cfg.norm_across_frames, name="norm", **kw)(x)
    h = nn.Dense(c, name="proj_in", **kw)(h)
    h = h.reshape(b, f, hh * ww, c).transpose(0, 2, 1, 3)              # (B, N, F, C)
    h = constrain(h, (DATA, FRAMES, None, None))
    for i in range(cfg.num_transformer_blocks):
      h = TemporalTransformerBlock(cfg, self.attention_impl, name=f"transformer_blocks_{i}",
                                   free_noise=self.free_noise, **kw)(h)
    h = constrain(h.transpose(0, 2, 1, 3), (DATA, FRAMES, None, None))   # (B, F, N, C)
    init = nn.initializers.zeros if cfg.zero_init else nn.initializers.lecun_normal()
    h = nn.Dense(c, kernel_init=init, name="proj_out", **kw)(h)
    return h.reshape(b, f, hh, ww, c) + x.astype(self.dtype)


class MotionModule(nn.Module):
  """`VanillaTemporalModule`: a wrapper holding `temporal_transformer` (matches official keys).
  free_noise: None (plain) or FreeNoise windowed temporal attention (`adiff_jax.free_noise`)."""
  config: MotionModuleConfig
  attention_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  free_noise: Optional[FreeNoiseConfig] = None

  @nn.compact
  def __call__(self, x):
    return TemporalTransformer(self.config, self.attention_impl, name="temporal_transformer",
                               dtype=self.dtype, param_dtype=self.param_dtype,
                               free_noise=self.free_noise)(x)


# ---------------------------------------------------------------------------------------------
# The motion module as part of a UNet parameter tree. Its subtrees are the `motion_modules_<i>`
# children of the UNet blocks ("down_blocks_0/motion_modules_1/temporal_transformer/..."); these
# functions are the one place that knows it.

_PART = "motion_modules_"


def is_motion_module(path: str) -> bool:
  """Whether a '/'-joined parameter path lies inside a motion module."""
  return any(p.startswith(_PART) for p in path.split("/"))


def zero_init_path(path: str) -> bool:
  """The kernels that start at zero so that a fresh motion module is the identity."""
  return is_motion_module(path) and path.endswith("proj_out/kernel")


def split_motion_module(unet: dict) -> tuple[dict, dict]:
  """A UNet tree -> (the image UNet, the motion module): disjoint trees, same paths."""
  mm, image = split(unet, is_motion_module)
  return image, mm


def merge_motion_module(image_unet: dict, motion_module: dict) -> dict:
  """Inverse of `split_motion_module`; a path defined in both is an error."""
  return merge(image_unet, motion_module)


def image_model_alone(config, params: dict):
  """(config, params) of the frozen image model: motion modules removed (config.motion = None),
  so frames are denoised independently. `config` is a ModelConfig, `params` its parts."""
  return (dataclasses.replace(config, motion=None),
          dict(params, unet=split_motion_module(params["unet"])[0]))
