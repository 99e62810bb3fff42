"""ControlNet (SD1.5, lllyasviel v1.0 / v1.1, diffusers `ControlNetModel`) for video, in Flax.

A dense ControlNet conditions every frame on its own control image (edges, depth, pose, ...):
a copy of the UNet's input conv, time embedding, down blocks and mid block. The control image
(pixel size, values in [0, 1]) goes through the conditioning embedding (convs 16, 32, 96, 256
with three stride-2 steps, then a zero-initialised 3x3 conv to C0) and is added to
`conv_in(noisy latents)`. Zero-initialised 1x1 convs turn every skip feature of the down pass
and the mid block's output into residuals that `UNet3D(..., down_residuals=, mid_residual=)`
adds to its own, times `conditioning_scale`.

For video it runs per frame, with no motion modules, as diffusers' AnimateDiffControlNetPipeline
runs `ControlNetModel` on the B*F frames with the text repeated per frame. Unlike SparseCtrl
(`adiff_jax.sparse_ctrl`) the noisy latents are NOT zeroed and there is no keyframe mask.

This module also holds the parts both ControlNets share: the conditioning embedding, the
residual trunk (`control_trunk`: down pass, mid block, zero convs) and the UNet-copy init.
Everything is channels-last video (B, F, H, W, C), as in `adiff_jax.unet`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from adiff_jax.errors import InputError
from adiff_jax.layers import Conv2d
from adiff_jax.motion_module import is_motion_module
from adiff_jax.params import flatten, random_like, unflatten
from adiff_jax.sharding import DATA, FRAMES, constrain
from adiff_jax.unet import MidBlock, UNetConfig, _BlockSpec, down_pass, frame_time_embedding


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
  """The ControlNet-specific fields (diffusers `ControlNetModel` / LDM `cldm` config); the image
  layers' architecture is a `UNetConfig`, given beside it.

  conditioning_channels: channels of the control image (3 for every published SD1.5 model;
    LDM `hint_channels`).
  conditioning_embedding_channels: the conditioning embedding's convs (diffusers
    `conditioning_embedding_out_channels`); the control image is 2**(len - 1) times the latent
    size (8 for (16, 32, 96, 256), the VAE's factor).
  global_pool_conditions: every residual is averaged over H and W (LDM
    `global_average_pooling`; control_v11e_sd15_shuffle).
  conditioning_channel_order: "rgb", or "bgr" (the control image's channels are reversed
    first, diffusers `controlnet_conditioning_channel_order`).
  """
  conditioning_channels: int = 3
  conditioning_embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
  global_pool_conditions: bool = False
  conditioning_channel_order: str = "rgb"

  def __post_init__(self):
    if not self.conditioning_embedding_channels:
      raise InputError("conditioning_embedding_channels is empty: give at least one level")
    if self.conditioning_channel_order not in ("rgb", "bgr"):
      raise InputError(f"conditioning_channel_order must be 'rgb' or 'bgr', got "
                       f"{self.conditioning_channel_order!r}")
    if self.conditioning_channels < 1:
      raise InputError(f"conditioning_channels must be >= 1, got {self.conditioning_channels}")

  @classmethod
  def sd15(cls, **kw) -> "ControlNetConfig":
    """Every published SD1.5 ControlNet (v1.0 `control_sd15_*`, v1.1 `control_v11*_sd15_*`);
    shuffle: `global_pool_conditions=True`."""
    return cls(**kw)

  @property
  def condition_factor(self) -> int:
    """Control-image pixels per latent pixel: 2**(levels - 1)."""
    return 2 ** (len(self.conditioning_embedding_channels) - 1)


class ConditioningEmbedding(nn.Module):
  """The ControlNet conditioning embedding: conv_in, then per level a conv and a stride-2 conv
  (`blocks_<2i>`, `blocks_<2i+1>`), SiLU after each, then conv_out (zero at init) to C0."""
  channels: tuple[int, ...]
  out_channels: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ch = self.channels
    h = nn.silu(Conv2d(ch[0], name="conv_in", **kw)(x))
    for i in range(len(ch) - 1):
      h = nn.silu(Conv2d(ch[i], name=f"blocks_{2 * i}", **kw)(h))
      h = nn.silu(Conv2d(ch[i + 1], stride=2, name=f"blocks_{2 * i + 1}", **kw)(h))
    return Conv2d(self.out_channels, name="conv_out", **kw)(h)


def control_trunk(spec: _BlockSpec, x, temb, context, mid_motion: bool = False):
  """The trunk every ControlNet shares (its layers belong to the caller's compact method): the
  UNet's down blocks (`down_blocks_<i>`) and mid block (`mid_block`) on x (conv_in's output plus
  the condition embedding), then a zero 1x1 conv per skip feature (`controlnet_down_blocks_<k>`)
  and one on the mid block's output (`controlnet_mid_block`).

  Returns (down residuals: one per UNet skip feature, mid residual), not yet scaled.
  """
  ucfg = spec.config
  x, skips = down_pass(spec, x, temb, context)
  x = MidBlock(spec, ucfg.block_out_channels[-1], ucfg.heads[-1], mid_motion,
               name="mid_block")(x, temb, context)
  zero_conv = lambda name, c: Conv2d(c, kernel_size=1, padding=0, name=name, **spec.kw)
  down = [zero_conv(f"controlnet_down_blocks_{k}", s.shape[-1])(s) for k, s in enumerate(skips)]
  return down, zero_conv("controlnet_mid_block", x.shape[-1])(x)


def guess_mode_scales(n_down: int) -> np.ndarray:
  """diffusers' guess-mode weights: 10**linspace(-1, 0, n_down + 1), one per down residual
  (shallow ones weakest) and the last (1.0) for the mid residual."""
  return np.logspace(-1.0, 0.0, n_down + 1, dtype=np.float64).astype(np.float32)


class ControlNet(nn.Module):
  """Dense ControlNet: (noisy latents, timesteps, text, control images) -> (down residuals,
  mid residual) for `UNet3D(..., down_residuals=, mid_residual=)`.

  config: the ControlNet fields; unet: its image layers' architecture (for the published SD1.5
  ControlNets, `UNetConfig.sd15()`, the controlled UNet's). Parameter names follow diffusers'
  `ControlNetModel` (`conv_in`, `controlnet_cond_embedding/{conv_in, blocks_<i>, conv_out}`,
  `time_embedding`, `down_blocks_<i>`, `mid_block`, `controlnet_down_blocks_<k>`,
  `controlnet_mid_block`).
  """
  config: ControlNetConfig
  unet: UNetConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: Optional[str] = None
  remat: bool = False

  def check_inputs(self, sample, timesteps, context, condition):
    """Shape checks; they raise while tracing, before anything is compiled."""
    cfg, ucfg = self.config, self.unet
    if ucfg.addition_embed_type is not None:
      raise InputError("SDXL ControlNets (addition_embed_type "
                       f"{ucfg.addition_embed_type!r}) are not supported; SD1.5 ControlNets only")
    if sample.ndim != 5 or sample.shape[-1] != ucfg.in_channels:
      raise InputError(f"sample must be (B, F, H, W, {ucfg.in_channels}) latents, got {sample.shape}")
    b, f, h, w, _ = sample.shape
    k = ucfg.downsample_factor
    if h % k or w % k:
      raise InputError(f"latent size {h}x{w} is not divisible by the UNet's downsampling factor {k}")
    r = cfg.condition_factor
    want = (b, f, h * r, w * r, cfg.conditioning_channels)
    if condition.ndim != 5 or tuple(condition.shape) != want:
      raise InputError(f"condition must be one control image per frame, (B, F, H, W, C) = {want} "
                       f"(images in [0, 1] at {r}x the latent size {h}x{w}); got "
                       f"{tuple(condition.shape)}")
    t = jnp.shape(timesteps)
    if t not in ((), (b,), (b, f)):
      raise InputError(f"timesteps must be a scalar, (B,) or (B, F) = ({b}, {f}); got {t}")
    if context.ndim not in (3, 4) or context.shape[0] != b or (
        context.ndim == 4 and context.shape[1] != f) or context.shape[-1] != ucfg.cross_attention_dim:
      raise InputError(f"text context must be (B, L, {ucfg.cross_attention_dim}) or "
                       f"(B, F, L, {ucfg.cross_attention_dim}) with B={b}, F={f}; got {context.shape}")

  @nn.compact
  def __call__(self, sample, timesteps, context, condition, conditioning_scale=1.0, guess_mode=False):
    """sample (B, F, h, w, Cin) the UNet's noisy latents (its input, as the UNet gets them);
    timesteps scalar, (B,) or (B, F); context (B, L, D) or (B, F, L, D); condition (B, F, h*r,
    w*r, C) one control image per frame in [0, 1] (r = `config.condition_factor`, 8 for SD1.5);
    conditioning_scale a number (or a traced scalar: changing it does not recompile);
    guess_mode a bool (or a traced one: one program for both): diffusers' guess-mode weights
    (`guess_mode_scales`, 0.1 for the first residual up to 1.0 for the mid one) times the scale
    (not with `global_pool_conditions`, as diffusers). Which CFG half the ControlNet sees in guess
    mode (diffusers: the conditional one only) is the caller's choice.

    Returns (down residuals: a list with one array per UNet skip feature, the shapes UNet3D's
    skips have; mid residual (B, F, h/2**(n-1), w/2**(n-1), C_last)), both times the scale;
    with `global_pool_conditions` each is its H, W mean broadcast back to that shape.
    """
    self.check_inputs(sample, timesteps, context, condition)
    cfg, ucfg = self.config, self.unet
    spec = _BlockSpec(ucfg, None, self.attention_impl, self.remat, self.dtype, self.param_dtype)
    b, f = sample.shape[:2]
    c0 = ucfg.block_out_channels[0]

    temb = frame_time_embedding(timesteps, b, f, ucfg, self.dtype, self.param_dtype)
    context = context.astype(self.dtype)

    x = constrain(sample.astype(self.dtype), (DATA, FRAMES))
    x = Conv2d(c0, name="conv_in", **spec.kw)(x)
    cond = condition.astype(self.dtype)
    if cfg.conditioning_channel_order == "bgr":
      cond = cond[..., ::-1]
    x = x + ConditioningEmbedding(tuple(cfg.conditioning_embedding_channels), c0,
                                  name="controlnet_cond_embedding", **spec.kw)(cond)

    down, mid = control_trunk(spec, x, temb, context)

    scale = jnp.asarray(conditioning_scale, self.dtype)
    if cfg.global_pool_conditions or guess_mode is False:
      down = [d * scale for d in down]
      mid = mid * scale
    else:   # 1 + g * (w - 1): exactly 1 when g is 0, so a traced flag keeps one program
      g = jnp.asarray(guess_mode, self.dtype)
      w = [scale * (1 + g * (x - 1)) for x in guess_mode_scales(len(down)).tolist()]
      down = [d * w[k] for k, d in enumerate(down)]
      mid = mid * w[-1]
    if cfg.global_pool_conditions:
      pool = lambda a: jnp.broadcast_to(jnp.mean(a, axis=(2, 3), keepdims=True), a.shape)
      down, mid = [pool(d) for d in down], pool(mid)
    return down, mid


# ------------------------------------------------------------------------------ parameters


def param_shapes(config: ControlNetConfig, unet: UNetConfig):
  """Parameter shapes (jax.ShapeDtypeStruct tree) without compiling or allocating."""
  s = unet.downsample_factor
  c = s * config.condition_factor
  return jax.eval_shape(
      ControlNet(config, unet).init, jax.random.key(0),
      jnp.zeros((1, 1, s, s, unet.in_channels)), jnp.zeros((1,)),
      jnp.zeros((1, 1, unet.cross_attention_dim)),
      jnp.zeros((1, 1, c, c, config.conditioning_channels)))["params"]


_ZERO = ("controlnet_down_blocks_", "controlnet_mid_block/", "controlnet_cond_embedding/kernel",
         "controlnet_cond_embedding/conv_out/kernel")


def zero_init_path(path: str) -> bool:
  """Kernels that start at zero in a fresh ControlNet (diffusers' / LDM's `zero_module` convs:
  the residual convs and the condition embedding's output), so that it adds nothing."""
  return path.endswith("kernel") and path.startswith(_ZERO)


def random_params(config: ControlNetConfig, unet: UNetConfig, seed: int = 0) -> dict:
  """Random parameters (numpy, nothing compiled), zero where the published init is zero."""
  return random_like(param_shapes(config, unet), seed, zero=zero_init_path)


_UNET_COPIED = ("conv_in/", "time_embedding/", "down_blocks_", "mid_block/")


def copy_unet_layers(tree: dict, unet_params: dict, what: str = "ControlNet") -> dict:
  """`tree` with its image layers (conv_in, time embedding, down and mid blocks; motion modules
  excluded) replaced by the UNet's: diffusers' `from_unet`, LDM's ControlNet init."""
  flat = flatten(tree)
  src = flatten(unet_params)
  for k in flat:
    if k.startswith(_UNET_COPIED) and not is_motion_module(k):
      if k not in src or np.shape(src[k]) != tuple(np.shape(flat[k])):
        raise InputError(f"the UNet tree has no parameter {k} of shape {tuple(np.shape(flat[k]))}: "
                         f"not the UNet this {what} config describes")
      flat[k] = np.asarray(src[k])
  return unflatten(flat)


def init_from_unet(config: ControlNetConfig, unet: UNetConfig, unet_params: dict, seed: int = 0) -> dict:
  """A fresh ControlNet for training: image layers copied from a UNet tree, the condition
  embedding random, the zero convs zero (its residuals are zero until trained)."""
  return copy_unet_layers(random_params(config, unet, seed), unet_params)


# ------------------------------------------------------------------------------ checks


def check_compatible(unet: UNetConfig, base: UNetConfig, what: str = "ControlNet") -> None:
  """The ControlNet's residuals fit the base UNet's skips and its text context is the base's:
  same latent channels, block channels, layers per block and cross-attention width."""
  fields = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim")
  bad = [f"{f} {getattr(unet, f)} vs the UNet's {getattr(base, f)}" for f in fields
         if getattr(unet, f) != getattr(base, f)]
  if base.addition_embed_type is not None or unet.addition_embed_type is not None:
    bad.append("SDXL (added embeddings) is not supported")
  if bad:
    raise InputError(f"this {what} does not fit the UNet: {'; '.join(bad)}")


def check_params(config: ControlNetConfig, unet: UNetConfig, params: dict, what: str = "ControlNet") -> None:
  """The tree has exactly the parameters and shapes `ControlNet(config, unet)` takes."""
  want = flatten(param_shapes(config, unet))
  have = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  missing = [k for k in want if k not in have]
  extra = [k for k in have if k not in want]
  shape = [f"{k} {have[k]} (expected {tuple(want[k].shape)})" for k in want
           if k in have and have[k] != tuple(want[k].shape)]
  if missing or extra or shape:
    parts = [f"{n} {label}, e.g. {', '.join(v[:3])}" for n, label, v in
             ((len(missing), "missing", missing), (len(extra), "unexpected", extra),
              (len(shape), "misshapen", shape)) if n]
    raise InputError(f"the {what} parameters do not fit its config: {'; '.join(parts)}")
