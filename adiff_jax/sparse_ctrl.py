"""SparseCtrl (AnimateDiff v3): a ControlNet for sparse keyframe conditions, in Flax.

The official `SparseControlNetModel` (guoyww/AnimateDiff `animatediff/models/sparse_controlnet.py`):
a copy of the UNet's input conv, time embedding, down blocks and mid block, with motion modules
in the down blocks (one temporal self-attention per transformer block, pe 32, none in the mid
block). Its noisy-sample input is zeroed; the condition (zeros except at the keyframes, plus a
mask channel that is 1 on keyframes) goes through the condition embedding and is added to
`conv_in(0)`. Zero-initialised 1x1 convs turn every skip feature of the down pass and the mid
block's output into residuals that `UNet3D(..., down_residuals=, mid_residual=)` adds to its
own, times `conditioning_scale`.

Two published models, two presets:
- RGB (`v3_sd15_sparsectrl_rgb.ckpt`, `latent_condition.yaml`): the condition is VAE latents
  (4 channels + mask, at latent resolution) through one 3x3 conv (`use_simplified_condition_embedding`).
- scribble (`v3_sd15_sparsectrl_scribble.ckpt`, `image_condition.yaml`): the condition is an
  image in [0, 1] (3 channels + mask, at pixel resolution) through the ControlNet conditioning
  embedding (convs 16, 32, 96, 256 with three stride-2 steps, then a 3x3 conv to C0).

Everything is channels-last video (B, F, H, W, C), as in `adiff_jax.unet`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from adiff_jax.controlnet import ConditioningEmbedding, control_trunk, copy_unet_layers
from adiff_jax.controlnet import zero_init_path as _controlnet_zero_init
from adiff_jax.errors import InputError
from adiff_jax.layers import Conv2d
from adiff_jax.motion_module import MotionModuleConfig, is_motion_module
from adiff_jax.params import random_like
from adiff_jax.sharding import DATA, FRAMES, constrain
from adiff_jax.unet import UNetConfig, _BlockSpec, frame_time_embedding


def _official_motion(**kw) -> MotionModuleConfig:
  """SparseCtrl's motion modules: 8 heads, one transformer block with ONE Temporal_Self
  attention, pe 32, in all down levels, none in the mid block; per-frame GroupNorm."""
  return MotionModuleConfig(**{**dict(num_heads=8, num_transformer_blocks=1, num_attention_blocks=1,
                                      max_len=32, mid_block=False, inflated_groupnorm=True,
                                      resolutions=(1, 2, 4, 8)), **kw})


@dataclasses.dataclass(frozen=True)
class SparseCtrlConfig:
  """The SparseCtrl-specific fields (the official `controlnet_additional_kwargs`); the image
  layers' architecture is the UNet's own `UNetConfig`, given beside it.

  conditioning_channels: channels of the condition, without the mask (RGB latents 4, scribble 3).
  use_simplified_condition_embedding: one 3x3 conv (condition at latent resolution) instead of
    the conditioning embedding `conditioning_embedding_channels` (condition at
    2**(len-1) times the latent resolution).
  concat_conditioning_mask: a mask channel (1 on keyframes) after the condition channels.
  set_noisy_sample_input_to_zero: the noisy latents are replaced by zeros (both published
    models; diffusers always does it).
  motion: its motion modules (`num_attention_blocks=1`); `inflated_groupnorm` must stay True
    (the official code hard-codes per-frame GroupNorm in SparseCtrl, even next to a v1 UNet).
  """
  conditioning_channels: int = 4
  use_simplified_condition_embedding: bool = True
  conditioning_embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
  concat_conditioning_mask: bool = True
  set_noisy_sample_input_to_zero: bool = True
  motion: MotionModuleConfig = _official_motion()

  def __post_init__(self):
    if not self.motion.inflated_groupnorm:
      raise InputError("SparseCtrl normalises per frame (the official code hard-codes inflated "
                       "GroupNorm): motion.inflated_groupnorm must be True")
    if not self.use_simplified_condition_embedding and not self.conditioning_embedding_channels:
      raise InputError("conditioning_embedding_channels is empty: give at least one level")

  @classmethod
  def rgb(cls, **kw) -> "SparseCtrlConfig":
    """`v3_sd15_sparsectrl_rgb.ckpt`: VAE latents (x 0.18215) + mask -> one conv."""
    return cls(**{**dict(conditioning_channels=4, use_simplified_condition_embedding=True), **kw})

  @classmethod
  def scribble(cls, **kw) -> "SparseCtrlConfig":
    """`v3_sd15_sparsectrl_scribble.ckpt`: images in [0, 1] + mask -> embedding 16, 32, 96, 256."""
    return cls(**{**dict(conditioning_channels=3, use_simplified_condition_embedding=False), **kw})

  @classmethod
  def preset(cls, name: str, **kw) -> "SparseCtrlConfig":
    presets = {"rgb": cls.rgb, "scribble": cls.scribble}
    if name not in presets:
      raise InputError(f"unknown SparseCtrl preset {name!r}; choose from {sorted(presets)}")
    return presets[name](**kw)

  @property
  def kind(self) -> str:
    """"rgb" (latent condition, simplified embedding) or "scribble" (image condition)."""
    return "rgb" if self.use_simplified_condition_embedding else "scribble"

  @property
  def condition_factor(self) -> int:
    """Condition pixels per latent pixel: 1 (simplified) or 2**(levels - 1) (embedding)."""
    if self.use_simplified_condition_embedding:
      return 1
    return 2 ** (len(self.conditioning_embedding_channels) - 1)

  @property
  def embedding_in_channels(self) -> int:
    return self.conditioning_channels + int(self.concat_conditioning_mask)


class SparseControlNet(nn.Module):
  """SparseCtrl: (noisy latents, timesteps, text, condition, mask) -> (down residuals, mid residual).

  config: the SparseCtrl fields; unet: the architecture of the UNet it controls (its image
  layers are a copy of that UNet's conv_in, time embedding, down and mid blocks).
  Parameter names follow the official checkpoint (`conv_in`, `controlnet_cond_embedding`,
  `time_embedding`, `down_blocks_<i>` with `motion_modules_<j>/temporal_transformer`,
  `mid_block`, `controlnet_down_blocks_<k>`, `controlnet_mid_block`).
  """
  config: SparseCtrlConfig
  unet: UNetConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: Optional[str] = None
  remat: bool = False

  def check_inputs(self, sample, timesteps, context, condition, mask):
    cfg, ucfg = self.config, self.unet
    if sample.ndim != 5 or sample.shape[-1] != ucfg.in_channels:
      raise InputError(f"sample must be (B, F, H, W, {ucfg.in_channels}) latents, got {sample.shape}")
    b, f, h, w, _ = sample.shape
    k = ucfg.downsample_factor
    if h % k or w % k:
      raise InputError(f"latent size {h}x{w} is not divisible by the UNet's downsampling factor {k}")
    if f > cfg.motion.max_len:
      raise InputError(f"{f} frames exceed SparseCtrl's positional encoding "
                       f"(at most {cfg.motion.max_len} frames)")
    r = cfg.condition_factor
    want = (b, f, h * r, w * r, cfg.conditioning_channels)
    if condition.ndim != 5 or tuple(condition.shape) != want:
      kind = "latents" if r == 1 else f"images at {r}x the latent size"
      raise InputError(f"condition must be (B, F, H, W, C) = {want} ({cfg.kind}: {kind}); "
                       f"got {tuple(condition.shape)}")
    if cfg.concat_conditioning_mask:
      if mask is None:
        raise InputError("SparseCtrl needs the keyframe mask (B, F) or (B, F, H, W, 1)")
      if tuple(mask.shape) not in ((b, f), want[:4] + (1,)):
        raise InputError(f"mask must be (B, F) = {(b, f)} or {want[:4] + (1,)}; got {tuple(mask.shape)}")
    t = jnp.shape(timesteps)
    if t not in ((), (b,), (b, f)):
      raise InputError(f"timesteps must be a scalar, (B,) or (B, F) = ({b}, {f}); got {t}")
    if context.ndim not in (3, 4) or context.shape[0] != b or context.shape[-1] != ucfg.cross_attention_dim:
      raise InputError(f"text context must be (B, L, {ucfg.cross_attention_dim}) or "
                       f"(B, F, L, {ucfg.cross_attention_dim}) with B={b}; got {context.shape}")

  @nn.compact
  def __call__(self, sample, timesteps, context, condition, mask=None, conditioning_scale=1.0):
    """sample (B, F, H, W, Cin) the UNet's noisy latents (only their shape is used when
    `set_noisy_sample_input_to_zero`); timesteps scalar, (B,) or (B, F); context (B, L, D) or
    (B, F, L, D); condition (B, F, H*r, W*r, Cc) zeros except at keyframes (r =
    `config.condition_factor`); mask (B, F) or (B, F, H*r, W*r, 1), 1 on keyframes;
    conditioning_scale a number (or a traced scalar: changing it does not recompile).

    Returns (down residuals: a list with one array per UNet skip feature, the shapes UNet3D's
    skips have; mid residual (B, F, H/2**(n-1), W/2**(n-1), C_last)), both times the scale.
    """
    self.check_inputs(sample, timesteps, context, condition, mask)
    cfg, ucfg = self.config, self.unet
    spec = _BlockSpec(ucfg, cfg.motion, self.attention_impl, self.remat, self.dtype, self.param_dtype)
    kw = spec.kw
    b, f = sample.shape[:2]
    c0 = ucfg.block_out_channels[0]

    temb = frame_time_embedding(timesteps, b, f, ucfg, self.dtype, self.param_dtype)
    context = context.astype(self.dtype)

    x = constrain(sample.astype(self.dtype), (DATA, FRAMES))
    if cfg.set_noisy_sample_input_to_zero:
      x = jnp.zeros_like(x)
    x = Conv2d(c0, name="conv_in", **kw)(x)

    cond = condition.astype(self.dtype)
    if cfg.concat_conditioning_mask:
      m = jnp.asarray(mask, self.dtype)
      if m.ndim == 2:
        m = jnp.broadcast_to(m[:, :, None, None, None], cond.shape[:4] + (1,))
      cond = jnp.concatenate([cond, m], axis=-1)
    if cfg.use_simplified_condition_embedding:
      emb = Conv2d(c0, name="controlnet_cond_embedding", **kw)(cond)
    else:
      emb = ConditioningEmbedding(tuple(cfg.conditioning_embedding_channels), c0,
                                  name="controlnet_cond_embedding", **kw)(cond)
    x = x + emb

    down, mid = control_trunk(spec, x, temb, context, cfg.motion.mid_block)
    scale = jnp.asarray(conditioning_scale, self.dtype)
    return [d * scale for d in down], mid * scale


def sparse_condition(keyframes, indices: Sequence[int], frames: int):
  """The sparse condition and its mask from keyframes, as the official pipeline builds them.

  keyframes (B, K, H, W, C) (RGB: VAE latents x 0.18215; scribble: images in [0, 1]);
  indices: K frame indices (negative ones count from the end, as in Python).
  Returns (condition (B, frames, H, W, C): zeros except keyframe k at frame indices[k];
  mask (B, frames): 1.0 on those frames).
  """
  keyframes = jnp.asarray(keyframes)
  if keyframes.ndim != 5:
    raise InputError(f"keyframes must be (B, K, H, W, C), got shape {keyframes.shape}")
  idx = [int(i) for i in indices]
  if len(idx) != keyframes.shape[1]:
    raise InputError(f"{keyframes.shape[1]} keyframes but {len(idx)} frame indices")
  bad = [i for i in idx if not -frames <= i < frames]
  if bad:
    raise InputError(f"keyframe indices {bad} outside a {frames}-frame video")
  pos = [i % frames for i in idx]
  if len(set(pos)) != len(pos):
    raise InputError(f"keyframe indices {idx} name the same frame twice")
  b = keyframes.shape[0]
  cond = jnp.zeros((b, frames) + keyframes.shape[2:], keyframes.dtype).at[:, pos].set(keyframes)
  mask = jnp.zeros((b, frames), keyframes.dtype).at[:, pos].set(1)
  return cond, mask


# ------------------------------------------------------------------------------ parameters


def param_shapes(config: SparseCtrlConfig, unet: UNetConfig):
  """Parameter shapes (jax.ShapeDtypeStruct tree) without compiling or allocating."""
  s = unet.downsample_factor
  c = s * config.condition_factor
  return jax.eval_shape(
      SparseControlNet(config, unet).init, jax.random.key(0),
      jnp.zeros((1, 2, s, s, unet.in_channels)), jnp.zeros((1,)),
      jnp.zeros((1, 1, unet.cross_attention_dim)),
      jnp.zeros((1, 2, c, c, config.conditioning_channels)), jnp.zeros((1, 2)))["params"]


def zero_init_path(path: str) -> bool:
  """Kernels that start at zero (the official zero_module convs, as a ControlNet's, and the
  motion modules' proj_out), so that a fresh SparseCtrl adds nothing."""
  if _controlnet_zero_init(path):
    return True
  return is_motion_module(path) and path.endswith("proj_out/kernel")


def random_params(config: SparseCtrlConfig, unet: UNetConfig, seed: int = 0) -> dict:
  """Random parameters (numpy, nothing compiled), zero where the official init is zero."""
  return random_like(param_shapes(config, unet), seed, zero=zero_init_path)


def init_from_unet(config: SparseCtrlConfig, unet: UNetConfig, unet_params: dict, seed: int = 0) -> dict:
  """A fresh SparseCtrl whose image layers (conv_in, time embedding, down and mid blocks, the
  UNet's motion modules excluded) are copied from a UNet tree: the official `from_unet`."""
  return copy_unet_layers(random_params(config, unet, seed), unet_params, "SparseCtrl")
