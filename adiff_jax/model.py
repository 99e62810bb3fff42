"""The AnimateDiff model as one object: its configuration, parameter shapes and random init.

An AnimateDiff model has four parts: the image UNet, the motion module (inside the UNet tree,
see `motion_module.split_motion_module`), the CLIP text encoder and the VAE. Their parameters
are `{"unet": ..., "text_encoder": ..., "vae": ...}`; `model_dir.load` reads them from disk.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from adiff_jax.clip_text import CLIPTextConfig, CLIPTextModel
from adiff_jax.motion_module import MotionModuleConfig, split_motion_module, zero_init_path
from adiff_jax.params import random_like
from adiff_jax.unet import UNet3D, UNetConfig
from adiff_jax.vae import AutoencoderKL, VAEConfig

Pytree = Any
PARTS = ("unet", "text_encoder", "vae")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture of the four parts (runtime choices such as dtypes live elsewhere).
  motion=None: the image model alone."""
  unet: UNetConfig
  motion: Optional[MotionModuleConfig]
  text: CLIPTextConfig
  vae: VAEConfig

  @classmethod
  def sd15(cls, motion: str = "v3") -> "ModelConfig":
    return cls(UNetConfig.sd15(), MotionModuleConfig.preset(motion), CLIPTextConfig.sd15(),
               VAEConfig.sd15())

  @classmethod
  def tiny(cls) -> "ModelConfig":
    """The built-in CPU demo model: 64x64 video, 2-level UNet, 2-layer CLIP, 3-level VAE."""
    return cls(UNetConfig.tiny(), MotionModuleConfig.v3(num_heads=2, norm_groups=8),
               CLIPTextConfig.tiny(), VAEConfig.tiny(block_out_channels=(32, 64, 64)))

  @property
  def latent_factor(self) -> int:
    """Pixels per latent: the VAE's downsampling."""
    return self.vae.downsample_factor

  @property
  def size_multiple(self) -> int:
    """Image sizes must be multiples of this (VAE x UNet downsampling): 64 for SD1.5."""
    return self.vae.downsample_factor * self.unet.downsample_factor


def param_shapes(config, motion: Optional[MotionModuleConfig] = None) -> Pytree:
  """Parameter shapes (jax.ShapeDtypeStruct trees) without compiling or allocating anything.

  config: a ModelConfig -> {"unet", "text_encoder", "vae"}; or one part's config: UNetConfig
  (with `motion`, the motion module inside), CLIPTextConfig or VAEConfig -> that part's tree.
  """
  key = jax.random.key(0)
  if isinstance(config, ModelConfig):
    return {"unet": param_shapes(config.unet, config.motion), "text_encoder": param_shapes(config.text),
            "vae": param_shapes(config.vae)}
  if isinstance(config, UNetConfig):
    f = config.downsample_factor   # the smallest input the UNet takes; 2 frames for the motion module
    return jax.eval_shape(UNet3D(config, motion).init, key, jnp.zeros((1, 2, f, f, config.in_channels)),
                          jnp.zeros((1,)), jnp.zeros((1, 1, config.cross_attention_dim)),
                          added_cond=config.dummy_added_cond())["params"]
  if isinstance(config, CLIPTextConfig):
    return jax.eval_shape(CLIPTextModel(config).init, key, jnp.zeros((1, 2), jnp.int32))["params"]
  if isinstance(config, VAEConfig):
    v = config.downsample_factor
    return jax.eval_shape(AutoencoderKL(config).init, key, jnp.zeros((1, v, v, config.in_channels)))["params"]
  raise TypeError(f"param_shapes: unknown config type {type(config).__name__}")


def random_params(config: ModelConfig, seed: int = 0) -> dict:
  """Random parameters of every part (numpy, nothing compiled: seconds, not minutes); the
  motion module starts as the identity (zero `proj_out`), as in the official training code."""
  return {part: random_like(shapes, seed + i, zero=zero_init_path)
          for i, (part, shapes) in enumerate(param_shapes(config).items())}


def new_motion_module(unet: UNetConfig, motion: MotionModuleConfig, seed: int = 0) -> dict:
  """A fresh motion module for a UNet (identity at init): what a motion stage starts from."""
  return random_like(split_motion_module(param_shapes(unet, motion))[1], seed, zero=zero_init_path)
