"""The built-in tiny model that `python sample.py` uses when no checkpoint is given."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from adiff_jax.clip_text import CLIPTextModel
from adiff_jax.params import random_like
from adiff_jax.pipeline import ModelConfig
from adiff_jax.unet import UNet3D
from adiff_jax.vae import AutoencoderKL


def param_shapes(config: ModelConfig) -> dict:
  """Parameter shapes of every part, without compiling or allocating anything."""
  unet = UNet3D(config.unet, config.motion)
  f = config.unet.downsample_factor
  v = config.vae.downsample_factor
  key = jax.random.key(0)
  return {
      "unet": jax.eval_shape(unet.init, key, jnp.zeros((1, 2, f, f, config.unet.in_channels)),
                             jnp.zeros((1,)), jnp.zeros((1, 1, config.unet.cross_attention_dim)))["params"],
      "text_encoder": jax.eval_shape(CLIPTextModel(config.text).init, key,
                                     jnp.zeros((1, 2), jnp.int32))["params"],
      "vae": jax.eval_shape(AutoencoderKL(config.vae).init, key,
                            jnp.zeros((1, v, v, config.vae.in_channels)))["params"],
  }


def random_params(config: ModelConfig, seed: int = 0) -> dict:
  """Random parameters for every part (numpy, no compile: seconds, not minutes); motion modules
  start at identity. See `adiff_jax.params.random_like`."""
  return {part: random_like(shapes, seed + i)
          for i, (part, shapes) in enumerate(param_shapes(config).items())}


# A tiny model trained by train.py on the synthetic dataset, shipped with the package when present.
TRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_model")


def trained_model_dir() -> str | None:
  """The shipped trained tiny model (an Orbax model dir), or None when this build has none."""
  return TRAINED_DIR if os.path.isfile(os.path.join(TRAINED_DIR, "metadata.json")) else None


def load_builtin():
  """(ModelConfig, params, description) of the built-in demo model with RANDOM weights, used
  when no trained tiny model ships: said plainly, since its videos are noise."""
  config = ModelConfig.tiny()
  desc = ("built-in tiny model with RANDOM weights (no download; the output is noise, not a "
          "real animation: pass --ckpt for a real model)")
  return config, random_params(config, seed=0), desc
