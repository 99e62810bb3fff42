"""Text-to-video sampling: tokenizer -> CLIP -> denoising loop (one jitted scan) -> VAE decode.

Pure functions around `model.apply`; `Pipeline` only bundles the models, their parameters and
the compiled loops so a second call with the same shapes does not recompile.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adiff_jax.clip_text import CLIPTextModel
from adiff_jax.errors import InputError
from adiff_jax.model import ModelConfig, PARTS
from adiff_jax.params import dtype as dtype_of
from adiff_jax.schedulers import NoiseSchedule, SAMPLERS, make_sampler, sample, sample_init, sample_step
from adiff_jax.tokenizer import CLIPTokenizer
from adiff_jax.unet import UNet3D
from adiff_jax.vae import AutoencoderKL, decode_video

Pytree = Any


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample (defaults: the official AnimateDiff inference settings)."""
  frames: int = 16
  height: int = 512
  width: int = 512
  steps: int = 25
  guidance_scale: float = 7.5
  scheduler: str = "ddim"
  eta: float = 0.0
  clip_skip: int = 1
  vae_chunk: int = 8
  schedule: NoiseSchedule = NoiseSchedule.animatediff()


class Pipeline:
  """Bundles models, parameters and compiled loops.

  params: {"unet": ..., "text_encoder": ..., "vae": ...} (plain param trees, no "params" key).
  lora: optional "lora" collection for the UNet (MotionLoRAs / domain adapter, combined).
  mesh: optional (data, frames) mesh; the CFG batch is sharded over `data`, frames over `frames`.
  """

  def __init__(self, config: ModelConfig, params: Pytree, *, tokenizer: Optional[CLIPTokenizer] = None,
               lora: Optional[Pytree] = None, dtype: str = "f32", mesh=None,
               attention_impl: Optional[str] = None):
    missing = [p for p in PARTS if p not in params]
    if missing:
      raise InputError(f"pipeline parameters lack {missing} (have {sorted(params)})")
    self.config = config
    # One compute dtype for all three models (bf16 on accelerators; f32 is the CPU default).
    self.dtype = dtype_of(dtype)
    self.unet = UNet3D(config.unet, config.motion, dtype=self.dtype, attention_impl=attention_impl)
    self.text_encoder = CLIPTextModel(config.text, dtype=self.dtype, attention_impl=attention_impl)
    self.vae = AutoencoderKL(config.vae, dtype=self.dtype)
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, self.dtype), t)
    self.params = {p: cast(params[p]) for p in PARTS}
    self.lora = None if lora is None else cast(lora)
    self.tokenizer = tokenizer or CLIPTokenizer.default()
    self.mesh = mesh
    self._loops: dict = {}

  # -- checks ---------------------------------------------------------------------------------
  def check(self, cfg: SamplingConfig) -> None:
    """Clear errors before anything compiles."""
    m = self.config.size_multiple
    if cfg.height % m or cfg.width % m or cfg.height <= 0 or cfg.width <= 0:
      raise InputError(f"height and width must be positive multiples of {m} for this model "
                       f"(got {cfg.height}x{cfg.width})")
    mm = self.config.motion
    if mm is not None and cfg.frames > mm.max_len:
      raise InputError(f"{cfg.frames} frames exceed the motion module's positional encoding "
                       f"(at most {mm.max_len} frames)")
    if cfg.frames < 1:
      raise InputError("frames must be >= 1")
    if cfg.scheduler not in SAMPLERS:
      raise InputError(f"unknown scheduler {cfg.scheduler!r}; choose from {SAMPLERS}")

  # -- stages ---------------------------------------------------------------------------------
  def encode_prompts(self, prompts: Sequence[str], clip_skip: int = 1) -> jax.Array:
    """(B,) prompts -> text context (B, 77, D)."""
    ids = jnp.asarray(self.tokenizer(list(prompts)))
    return _encode_text(self.text_encoder, self.params["text_encoder"], ids, clip_skip)

  def initial_noise(self, seeds: Sequence[int], cfg: SamplingConfig) -> jax.Array:
    """Standard-normal latents (B, F, h, w, C), one independent stream per seed."""
    f = self.config.latent_factor
    shape = (cfg.frames, cfg.height // f, cfg.width // f, self.config.unet.in_channels)
    return jnp.stack([jax.random.normal(seed_key(s), shape, jnp.float32) for s in seeds])

  def denoise(self, noise: jax.Array, cond: jax.Array, uncond: jax.Array, cfg: SamplingConfig,
              progress: bool = True) -> jax.Array:
    """The whole denoising loop, compiled once per (shape, scheduler, steps)."""
    sampler = make_sampler(cfg.scheduler, cfg.schedule, cfg.steps, eta=cfg.eta)
    key = (cfg.scheduler, cfg.steps, cfg.eta, cfg.schedule, progress)
    if key not in self._loops:
      self._loops[key] = _make_loop(self.unet, sampler, progress)
    loop = self._loops[key]
    args = (self.params["unet"], self.lora, noise, cond, uncond,
            jnp.float32(cfg.guidance_scale), jax.random.key(0))
    if self.mesh is None:
      return loop(*args)
    with jax.set_mesh(self.mesh):
      return loop(*args)

  def decode(self, latents: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Latents (B, F, h, w, 4) -> frames (B, F, H, W, 3) in [0, 1], decoded in frame chunks."""
    x = decode_video(self.vae, {"params": self.params["vae"]}, latents.astype(self.dtype),
                     chunk_size=cfg.vae_chunk)
    return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

  def __call__(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]] = None,
               seeds: Sequence[int] = (0,), cfg: SamplingConfig = SamplingConfig(),
               noise: Optional[jax.Array] = None, progress: bool = True) -> np.ndarray:
    """Prompts -> frames (B, F, H, W, 3) float32 in [0, 1]. One sample per (prompt, seed) pair."""
    self.check(cfg)
    prompts = list(prompts)
    negative = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    if len(negative) != len(prompts) or len(seeds) != len(prompts):
      raise InputError(f"need one negative prompt and one seed per prompt: got {len(prompts)} "
                       f"prompts, {len(negative)} negative prompts, {len(seeds)} seeds")
    cond = self.encode_prompts(prompts, cfg.clip_skip)
    uncond = self.encode_prompts(negative, cfg.clip_skip)
    if noise is None:
      noise = self.initial_noise(seeds, cfg)
    latents = self.denoise(noise, cond, uncond, cfg, progress)
    if not bool(jnp.isfinite(latents).all()):
      raise FloatingPointError(
          "the denoising loop produced NaN/inf latents (a black video otherwise). Try --dtype f32, "
          "check that the checkpoint converted cleanly (python -m convert_weights inspect ...), "
          "or lower the guidance scale / LoRA alphas.")
    return np.asarray(self.decode(latents, cfg))


def seed_key(seed: int) -> jax.Array:
  """PRNG key of a user seed; seeds up to 2**64 (the official configs use such) stay distinct."""
  seed = int(seed)
  if not 0 <= seed < 2**64:
    raise InputError(f"seed must be in [0, 2**64), got {seed}")
  return jax.random.fold_in(jax.random.key(seed & 0xFFFFFFFF), seed >> 32)


@functools.partial(jax.jit, static_argnames=("model", "clip_skip"))
def _encode_text(model, params, ids, clip_skip):
  return model.apply({"params": params}, ids, clip_skip=clip_skip)


def _make_loop(unet: UNet3D, sampler, progress: bool):
  """(unet_params, lora, noise, cond, uncond, guidance, key) -> latents.

  Without progress: the whole loop is one jitted `lax.scan`. With progress: one jitted step
  driven from the host, which advances the bar between steps; nothing calls back to the host
  from inside a compiled program, so every program stays in the persistent compilation cache.
  """
  def guided_eps(params, lora, cond, uncond, guidance):
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    ctx = jnp.concatenate([uncond, cond]).astype(unet.dtype)   # (2B, 77, D): CFG in one batch

    def eps_fn(x, t):
      xx = jnp.concatenate([x, x]).astype(unet.dtype)          # (2B, F, h, w, C)
      out = unet.apply(variables, xx, jnp.broadcast_to(t, (xx.shape[0],)), ctx)
      e_uncond, e_cond = jnp.split(out.astype(jnp.float32), 2)
      return e_uncond + guidance * (e_cond - e_uncond)
    return eps_fn

  def whole(params, lora, noise, cond, uncond, guidance, key):
    eps_fn = guided_eps(params, lora, cond, uncond, guidance)
    return sample(sampler, eps_fn, noise, key=key if sampler.eta else None)

  if not progress:
    return jax.jit(whole)

  init = jax.jit(lambda noise, key: sample_init(sampler, noise, key=key if sampler.eta else None))
  step = jax.jit(lambda params, lora, x, state, cond, uncond, guidance, i: sample_step(
      sampler, guided_eps(params, lora, cond, uncond, guidance), x, state, i))

  def stepwise(params, lora, noise, cond, uncond, guidance, key):
    from tqdm.auto import tqdm
    x, state = init(noise, key)
    for i in tqdm(range(sampler.num_steps), desc="denoising", unit="step", leave=False):
      x, state = step(params, lora, x, state, cond, uncond, guidance, jnp.int32(i))
    return x

  return stepwise
