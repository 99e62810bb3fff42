"""The AnimateDiff model as one object: its configuration, parameter shapes and random init.

An AnimateDiff model has four parts: the image UNet, the motion module (inside the UNet tree,
see `motion_module.split_motion_module`), the CLIP text encoder and the VAE. Their parameters
are `{"unet": ..., "text_encoder": ..., "vae": ...}`; `model_dir.load` reads them from disk.
An SDXL model has a fifth, its second text encoder (OpenCLIP bigG with projection):
`"text_encoder_2"` (`ModelConfig.text_2`, see `adiff_jax.sdxl_text`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from adiff_jax.clip_text import CLIPTextConfig, CLIPTextModel
from adiff_jax.errors import InputError
from adiff_jax.motion_module import MotionModuleConfig, split_motion_module, zero_init_path
from adiff_jax.params import random_like
from adiff_jax.unet import UNet3D, UNetConfig
from adiff_jax.vae import AutoencoderKL, VAEConfig

Pytree = Any
PARTS = ("unet", "text_encoder", "vae")      # every base model has these
OPTIONAL_PARTS = ("text_encoder_2",)         # SDXL's second text encoder
ALL_PARTS = PARTS + OPTIONAL_PARTS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture of the parts (runtime choices such as dtypes live elsewhere).
  motion=None: the image model alone. text_2: SDXL's second text encoder (None for SD1.5); its
  hidden width plus text's is the UNet's context width, its projection the pooled text width."""
  unet: UNetConfig
  motion: Optional[MotionModuleConfig]
  text: CLIPTextConfig
  vae: VAEConfig
  text_2: Optional[CLIPTextConfig] = None

  def __post_init__(self):
    if self.text_2 is None or self.unet is None or self.text is None:
      return
    ctx = self.text.hidden_size + self.text_2.hidden_size
    if ctx != self.unet.cross_attention_dim:
      raise InputError(f"SDXL text encoders give {self.text.hidden_size} + {self.text_2.hidden_size} "
                       f"= {ctx} context channels; the UNet's cross_attention_dim is "
                       f"{self.unet.cross_attention_dim}")
    want = (self.unet.added_cond_shapes or {}).get("text_embeds")
    if self.text_2.projection_dim is None or self.text_2.projection_dim != want:
      raise InputError(f"text_2.projection_dim {self.text_2.projection_dim}: the UNet's added "
                       f"embedding takes pooled text of width {want}")

  @classmethod
  def sd15(cls, motion: str = "v3") -> "ModelConfig":
    return cls(UNetConfig.sd15(), MotionModuleConfig.preset(motion), CLIPTextConfig.sd15(),
               VAEConfig.sd15())

  @classmethod
  def sdxl(cls, motion: Optional[str] = "sdxl") -> "ModelConfig":
    """SDXL base + the AnimateDiff SDXL motion module (motion=None: the image model alone)."""
    return cls(UNetConfig.sdxl(), MotionModuleConfig.preset(motion) if motion else None,
               CLIPTextConfig.sdxl_l(), VAEConfig.sdxl(), CLIPTextConfig.sdxl_bigg())

  @classmethod
  def tiny_sdxl(cls) -> "ModelConfig":
    """Test-sized SDXL: 3-level UNet (32/64/64, no transformers at level 0, text_time added
    embedding: pooled 16 + 6 x 8), two 16-wide text encoders (context 32; the second with exact
    GELU and a 16-wide projection), SDXL motion module, the tiny model's 3-level VAE with SDXL's
    scaling."""
    unet = UNetConfig.sdxl(block_out_channels=(32, 64, 64), attention_heads=(2, 4, 4),
                           transformer_depth=(1, 1, 2), cross_attention_dim=32, norm_num_groups=8,
                           addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
    text = CLIPTextConfig(hidden_size=16, intermediate_size=37, num_layers=2, num_heads=2)
    text_2 = CLIPTextConfig(hidden_size=16, intermediate_size=37, num_layers=3, num_heads=2,
                            hidden_act="gelu", projection_dim=16)
    return cls(unet, MotionModuleConfig.sdxl(num_heads=2, norm_groups=8), text,
               VAEConfig.tiny(block_out_channels=(32, 64, 64), scaling_factor=VAEConfig.sdxl().scaling_factor),
               text_2)

  @classmethod
  def tiny(cls) -> "ModelConfig":
    """The built-in CPU demo model: 64x64 video, 2-level UNet, 2-layer CLIP, 3-level VAE."""
    return cls(UNetConfig.tiny(), MotionModuleConfig.v3(num_heads=2, norm_groups=8),
               CLIPTextConfig.tiny(), VAEConfig.tiny(block_out_channels=(32, 64, 64)))

  @property
  def parts(self) -> tuple[str, ...]:
    """The parameter parts this model has: PARTS, plus "text_encoder_2" for SDXL."""
    return PARTS + (("text_encoder_2",) if self.text_2 is not None else ())

  @property
  def is_sdxl(self) -> bool:
    return self.text_2 is not None

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

  config: a ModelConfig -> {"unet", "text_encoder", "vae"} (+ "text_encoder_2" for SDXL); or one
  part's config: UNetConfig (with `motion`, the motion module inside), CLIPTextConfig or
  VAEConfig -> that part's tree.
  """
  key = jax.random.key(0)
  if isinstance(config, ModelConfig):
    out = {"unet": param_shapes(config.unet, config.motion), "text_encoder": param_shapes(config.text),
           "vae": param_shapes(config.vae)}
    if config.text_2 is not None:
      out["text_encoder_2"] = param_shapes(config.text_2)
    return out
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
  motion module starts as the identity (zero `proj_out`), as in the official training code.
  Part i (in `config.parts` order) uses seed + i."""
  return {part: random_like(shapes, seed + i, zero=zero_init_path)
          for i, (part, shapes) in enumerate(param_shapes(config).items())}


def new_motion_module(unet: UNetConfig, motion: MotionModuleConfig, seed: int = 0) -> dict:
  """A fresh motion module for a UNet (identity at init): what a motion stage starts from."""
  return random_like(split_motion_module(param_shapes(unet, motion))[1], seed, zero=zero_init_path)
