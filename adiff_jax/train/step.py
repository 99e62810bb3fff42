"""Loss and train-step functions (pure; jitted by `make_train_step`).

Diffusion stages use the official objective: VAE-encode the clip to scaled latents (a
posterior sample, as `vae.encode(x).latent_dist.sample() * 0.18215`), draw noise and
t ~ U{0..999}, noise with the "linear" training schedule, and regress the noise (epsilon MSE).
Text goes through our CLIP; the 10% empty captions come from the data pipeline. With
pre-computed data (`adiff_jax.train.precompute`) the batch carries the scaled posterior mean/std
(a fresh sample per step) and optionally the text embeddings, and the frozen encoders are skipped.
The `vae` stage trains the autoencoder itself (reconstruction MSE + a small KL).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from adiff_jax import schedulers
from adiff_jax.clip_text import CLIPTextModel
from adiff_jax.model import ModelConfig
from adiff_jax.params import dtype as dtype_of
from adiff_jax.train.config import OptimConfig, TrainConfig
from adiff_jax.params import merge
from adiff_jax.train.state import IMAGE_STAGES, learning_rate, make_optimizer, resolve_optim
from adiff_jax.unet import UNet3D
from adiff_jax.vae import AutoencoderKL, encode_video

Pytree = Any


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything the compiled step depends on besides arrays. Hashable: a static jit argument,
  so trainers with equal specs share one compiled step."""
  stage: str
  unet: UNet3D
  text: CLIPTextModel
  vae: AutoencoderKL
  schedule: schedulers.NoiseSchedule
  optim: OptimConfig
  seed: int = 0
  vae_chunk: int = 0          # frames per encoder call; 0: all frames at once
  kl_weight: float = 1e-3
  noise_offset: float = 0.0
  snr_gamma: float = 5.0       # used when loss_weighting == "min_snr"
  min_timestep: int = 0
  loss_weighting: str = "none"


def make_spec(cfg: TrainConfig, model: ModelConfig) -> StepSpec:
  dt = dtype_of(cfg.dtype)
  motion = None if cfg.stage in IMAGE_STAGES else model.motion
  return StepSpec(
      stage=cfg.stage,
      unet=UNet3D(model.unet, motion, dtype=dt, attention_impl=cfg.attention_impl, remat=cfg.remat),
      text=CLIPTextModel(model.text, attention_impl=cfg.attention_impl, dtype=dt),
      vae=AutoencoderKL(model.vae, dtype=dt),
      schedule=schedulers.NoiseSchedule.animatediff(),
      optim=resolve_optim(cfg.optim, cfg.steps), seed=cfg.seed, vae_chunk=cfg.vae_chunk,
      kl_weight=cfg.vae_kl_weight, noise_offset=cfg.noise_offset, snr_gamma=cfg.snr_gamma,
      min_timestep=cfg.min_timestep, loss_weighting=cfg.loss_weighting)


def encode_latents(spec: StepSpec, vae_params, batch: dict, key) -> jax.Array:
  """Scaled latents (B, F, h, w, 4): precomputed `latents` if the batch has them, a sample of a
  precomputed (scaled) posterior `latent_mean` + `latent_std` * eps, else a posterior sample of
  the (frozen) VAE. Both samples draw eps in the same order, so equal keys give equal latents."""
  if "latents" in batch:
    return batch["latents"].astype(jnp.float32)
  if "latent_mean" in batch:
    mean = batch["latent_mean"].astype(jnp.float32)
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + batch["latent_std"].astype(jnp.float32) * eps
  video = batch["video"]
  chunk = spec.vae_chunk or video.shape[0] * video.shape[1]
  z = encode_video(spec.vae, {"params": vae_params}, video, key, chunk_size=chunk)
  return jax.lax.stop_gradient(z.astype(jnp.float32))


def text_context(spec: StepSpec, text_params, batch: dict) -> jax.Array:
  """CLIP hidden states: stored `text_emb` (caption dropout already applied by the loader), or
  the frozen text encoder on the token ids."""
  if "text_emb" in batch:
    return batch["text_emb"].astype(spec.text.dtype)
  return spec.text.apply({"params": text_params}, batch["ids"])


def diffusion_loss(spec: StepSpec, tree: dict, batch: dict, key) -> tuple[jax.Array, dict]:
  k_enc, k_noise, k_t, k_off = jax.random.split(key, 4)
  latents = encode_latents(spec, tree["vae"], batch, k_enc)
  context = text_context(spec, tree["text_encoder"], batch)
  noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
  if spec.noise_offset:
    # "Offset noise": a per-(sample, channel) constant in the noise, so the model cannot read an
    # image's mean colour from the noise at high t (SD's schedule keeps some signal at t=999,
    # which pure-noise sampling does not have). Same offset on every frame of a clip.
    b, c = latents.shape[0], latents.shape[-1]
    offset = jax.random.normal(k_off, (b, 1, 1, 1, c), jnp.float32)
    noise = noise + spec.noise_offset * offset
  t = schedulers.sample_timesteps(k_t, latents.shape[0], spec.schedule.num_train_timesteps,
                                 spec.min_timestep)
  noisy = schedulers.add_noise(spec.schedule, latents, noise, t)
  variables = {"params": tree["unet"]}
  if "lora" in tree:
    variables["lora"] = tree["lora"]
  pred = spec.unet.apply(variables, noisy, t, context)
  target = schedulers.training_target(spec.schedule, latents, noise, t)
  err = jnp.square(pred.astype(jnp.float32) - target)
  if spec.loss_weighting == "none":
    return jnp.mean(err), {}
  per_sample = jnp.mean(err, axis=tuple(range(1, err.ndim)))             # (B,)
  if spec.loss_weighting == "min_snr":
    weight = schedulers.min_snr_weight(spec.schedule, t, spec.snr_gamma)
  else:
    weight = schedulers.v_space_weight(spec.schedule, t)
  return jnp.mean(weight * per_sample), {"mse": jnp.mean(err)}


def vae_loss(spec: StepSpec, tree: dict, batch: dict, key) -> tuple[jax.Array, dict]:
  """Autoencoder training on frames: MSE reconstruction + kl_weight * per-element KL."""
  video = batch["video"]
  frames = video.reshape((-1,) + video.shape[2:])
  variables = {"params": tree["vae"]}
  post = spec.vae.apply(variables, frames, method=AutoencoderKL.encode)
  rec = spec.vae.apply(variables, post.sample(key), method=AutoencoderKL.decode)
  mse = jnp.mean(jnp.square(rec.astype(jnp.float32) - frames))
  kl = jnp.mean(post.kl()) / post.mean[0].size
  return mse + spec.kl_weight * kl, {"mse": mse, "kl": kl}


def loss_fn(trainable: Pytree, spec: StepSpec, frozen: Pytree, batch: dict, key):
  tree = merge(trainable, frozen)
  if spec.stage == "vae":
    return vae_loss(spec, tree, batch, key)
  return diffusion_loss(spec, tree, batch, key)


def step_key(spec: StepSpec, step) -> jax.Array:
  """The step's randomness is a function of (seed, step) alone: resumes replay it exactly."""
  return jax.random.fold_in(jax.random.key(spec.seed), step)


def train_step(spec: StepSpec, state: dict, frozen: Pytree, batch: dict) -> tuple[dict, dict]:
  """One optimizer step. A non-finite loss or gradient leaves weights and optimizer state
  untouched (the update is skipped in-graph) and is reported through `finite`."""
  key = step_key(spec, state["step"])
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"], spec, frozen, batch, key)
  grad_norm = optax.tree.norm(grads)
  updates, opt = make_optimizer(spec.optim).update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  # Also refuse an update that would overflow the weights: they can never become non-finite.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(params))
  keep = lambda new, old: jnp.where(finite, new, old)
  new_state = {"step": state["step"] + 1,
               "params": jax.tree.map(keep, params, state["params"]),
               "opt": jax.tree.map(keep, opt, state["opt"])}
  metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
             "lr": learning_rate(spec.optim)(state["step"]), **aux}
  return new_state, metrics


def make_train_step(spec: StepSpec, state_shardings, frozen_shardings, batch_shardings,
                    replicated, compiler_options: Optional[dict] = None):
  """jax.jit of `train_step` with explicit shardings; the state (argument 1) is donated."""
  fn = jax.jit(train_step, static_argnums=0,
               in_shardings=(state_shardings, frozen_shardings, batch_shardings),
               out_shardings=(state_shardings, replicated), donate_argnums=1,
               compiler_options=compiler_options or None)
  return lambda *args: fn(spec, *args), fn
