"""Text-to-video sampling: tokenizer -> CLIP -> denoising loop (one jitted scan) -> VAE decode.

Pure functions around `model.apply`; `Pipeline` only bundles the models, their parameters and
the compiled loops so a second call with the same shapes does not recompile.

Long videos (docs/long_videos.md): `SamplingConfig.context` runs the UNet on overlapping frame
windows and fuses them (adiff_jax/context.py); prompts may travel ({frame: text}, see
adiff_jax/prompt_travel.py); `free_init` re-runs sampling from re-noised low frequencies
(adiff_jax/free_init.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adiff_jax import free_init as free_init_lib
from adiff_jax import prompt_travel
from adiff_jax.clip_text import CLIPTextModel
from adiff_jax.control import ControlNetSampling, ControlUnit, pack_frames, residuals
from adiff_jax.context import ContextConfig, WindowPlan, fused_eps, plan_windows
from adiff_jax.errors import InputError
from adiff_jax.free_noise import FreeNoiseConfig, reschedule_noise
from adiff_jax.model import ModelConfig
from adiff_jax.params import dtype as dtype_of
from adiff_jax.schedulers import (NoiseSchedule, SAMPLERS, make_sampler, noise_to_step, sample_init,
                                  sample_step, start_at)
from adiff_jax.tokenizer import CLIPTokenizer
from adiff_jax.unet import UNet3D
from adiff_jax.vae import AutoencoderKL, decode_video, encode_video

Pytree = Any


@dataclasses.dataclass(frozen=True)
class SparseCtrlSampling:
  """SparseCtrl conditioning settings (the condition and mask are call-time inputs, see
  `Pipeline.sparse_condition`). conditioning_scale multiplies the residuals (official 1.0); it is
  a traced input, so changing it does not recompile."""
  conditioning_scale: float = 1.0


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
  # Long videos. context: whole-UNet context windows (None: the UNet sees all frames at once).
  context: Optional[ContextConfig] = None
  context_batch: Optional[int] = None   # windows per UNet call (default: the mesh's data size, or 1)
  prompt_interpolation: str = "lerp"    # travelling prompts: lerp | slerp
  free_init: Optional[free_init_lib.FreeInitConfig] = None
  free_noise: Optional[FreeNoiseConfig] = None  # noise rescheduling + motion-module windows
  # SparseCtrl keyframe conditioning (needs Pipeline(..., sparse_ctrl=...) and `control=` at call time)
  sparse_ctrl: Optional[SparseCtrlSampling] = None
  # Dense ControlNets, one entry per Pipeline(..., controlnets=) model (empty: defaults for each);
  # their frames are `controlnet_frames=` at call time.
  controlnets: tuple[ControlNetSampling, ...] = ()
  # Video-to-video (with `init_video=` at call time): the share of the steps that run, from the
  # input video noised to the first of them (diffusers AnimateDiffVideoToVideoPipeline, default 0.8).
  strength: float = 0.8

  def start_step(self) -> int:
    """Index of the first step video-to-video runs: steps - int(steps * strength), as diffusers."""
    return self.steps - min(int(self.steps * self.strength), self.steps)

  @property
  def guided(self) -> bool:
    """Whether the unconditional half runs: guidance <= 1 means the conditional prediction
    alone, as in diffusers (`do_classifier_free_guidance = guidance_scale > 1`)."""
    return self.guidance_scale > 1.0


class Pipeline:
  """Bundles models, parameters and compiled loops.

  params: {"unet": ..., "text_encoder": ..., "vae": ...} (plain param trees, no "params" key).
  lora: optional "lora" collection for the UNet (MotionLoRAs / domain adapter, combined).
  mesh: optional (data, frames) mesh; the CFG batch is sharded over `data`, frames over `frames`.
  sparse_ctrl: optional (SparseCtrlConfig, params) of a SparseCtrl for this UNet (docs/control.md).
  controlnets: dense ControlNets, each (ControlNetConfig, its UNetConfig, params) as
    `convert_weights.controlnet_files.load_controlnet` gives them (tree, config, unet) reordered.
  """

  def __init__(self, config: ModelConfig, params: Pytree, *, tokenizer: Optional[CLIPTokenizer] = None,
               tokenizer_2: Optional[CLIPTokenizer] = None,
               lora: Optional[Pytree] = None, dtype: str = "f32", mesh=None,
               attention_impl: Optional[str] = None, sparse_ctrl: Optional[tuple] = None,
               controlnets: Sequence[tuple] = ()):
    missing = [p for p in config.parts if p not in params]
    if missing:
      raise InputError(f"pipeline parameters lack {missing} (have {sorted(params)})")
    self.config = config
    # One compute dtype for all three models (bf16 on accelerators; f32 is the CPU default).
    self.dtype = dtype_of(dtype)
    self.attention_impl = attention_impl
    self.unet = self.unet_for(None)
    self.text_encoder = CLIPTextModel(config.text, dtype=self.dtype, attention_impl=attention_impl)
    self.vae = AutoencoderKL(config.vae, dtype=self.dtype)
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, self.dtype), t)
    self.params = {p: cast(params[p]) for p in config.parts}
    self.lora = None if lora is None else cast(lora)
    self.tokenizer = tokenizer or CLIPTokenizer.default()
    self.text_encoder_2 = self.tokenizer_2 = None
    if config.is_sdxl:   # SDXL: a second text encoder, its tokenizer pads with "!"
      from adiff_jax.sdxl_text import PAD_2
      self.text_encoder_2 = CLIPTextModel(config.text_2, dtype=self.dtype, attention_impl=attention_impl)
      self.tokenizer_2 = tokenizer_2 or CLIPTokenizer.default(pad=PAD_2)
    self.mesh = mesh
    self._loops: dict = {}
    self.sparse_ctrl = self.sparse_ctrl_params = None
    if sparse_ctrl is not None:
      self._set_sparse_ctrl(*sparse_ctrl)
    self.controlnets, self.controlnet_params = [], []
    for k, (cn_config, cn_unet, cn_params) in enumerate(controlnets):
      self._add_controlnet(k, cn_config, cn_unet, cn_params)

  def _add_controlnet(self, k: int, cn_config, cn_unet, cn_params) -> None:
    from adiff_jax.controlnet import ControlNet, check_compatible, check_params
    what = f"ControlNet {k}"
    check_compatible(cn_unet, self.config.unet, what)
    if cn_config.condition_factor != self.config.latent_factor:
      raise InputError(f"{what} takes images at {cn_config.condition_factor}x the latent size, but "
                       f"the VAE's factor is {self.config.latent_factor}")
    check_params(cn_config, cn_unet, cn_params, what)
    self.controlnets.append(ControlNet(cn_config, cn_unet, dtype=self.dtype,
                                       attention_impl=self.attention_impl))
    self.controlnet_params.append(jax.tree.map(lambda a: jnp.asarray(a, self.dtype), cn_params))

  def _set_sparse_ctrl(self, ctrl_config, ctrl_params) -> None:
    from adiff_jax.sparse_ctrl import SparseControlNet, param_shapes
    if self.config.is_sdxl:
      raise InputError("SparseCtrl exists for SD1.5 only; this is an SDXL model")
    want = jax.tree_util.tree_flatten_with_path(param_shapes(ctrl_config, self.config.unet))[0]
    have = dict((jax.tree_util.keystr(k), np.shape(v))
                for k, v in jax.tree_util.tree_flatten_with_path(ctrl_params)[0])
    bad = [jax.tree_util.keystr(k) for k, v in want if have.get(jax.tree_util.keystr(k)) != tuple(v.shape)]
    if bad or len(have) != len(want):
      raise InputError(f"the SparseCtrl parameters do not fit this UNet ({self.config.unet}) and "
                       f"SparseCtrl config: {len(bad)} missing or misshapen, e.g. {bad[:3]}")
    if ctrl_config.kind == "scribble" and ctrl_config.condition_factor != self.config.latent_factor:
      raise InputError(f"this scribble SparseCtrl takes images at {ctrl_config.condition_factor}x the "
                       f"latent size, but the VAE's factor is {self.config.latent_factor}")
    self.sparse_ctrl = SparseControlNet(ctrl_config, self.config.unet, dtype=self.dtype,
                                        attention_impl=self.attention_impl)
    self.sparse_ctrl_params = jax.tree.map(lambda a: jnp.asarray(a, self.dtype), ctrl_params)

  def unet_for(self, free_noise: Optional[FreeNoiseConfig]) -> UNet3D:
    """The UNet module, with FreeNoise windows in its motion modules when asked."""
    return UNet3D(self.config.unet, self.config.motion, dtype=self.dtype,
                  attention_impl=self.attention_impl, free_noise=free_noise)

  # -- checks ---------------------------------------------------------------------------------
  def check(self, cfg: SamplingConfig) -> None:
    """Clear errors before anything compiles."""
    m = self.config.size_multiple
    if cfg.height % m or cfg.width % m or cfg.height <= 0 or cfg.width <= 0:
      raise InputError(f"height and width must be positive multiples of {m} for this model "
                       f"(got {cfg.height}x{cfg.width})")
    if cfg.frames < 1:
      raise InputError("frames must be >= 1")
    mm = self.config.motion
    if mm is not None:
      if cfg.context is not None and cfg.context.context_length > mm.max_len:
        raise InputError(f"context_length {cfg.context.context_length} exceeds the motion module's "
                         f"positional encoding ({mm.max_len} frames)")
      if cfg.free_noise is not None and cfg.free_noise.context_length > mm.max_len:
        raise InputError(f"FreeNoise context_length {cfg.free_noise.context_length} exceeds the motion "
                         f"module's positional encoding ({mm.max_len} frames)")
      if cfg.context is None and cfg.free_noise is None and cfg.frames > mm.max_len:
        raise InputError(f"{cfg.frames} frames exceed the motion module's positional encoding "
                         f"(at most {mm.max_len} frames): sample long videos with context windows, "
                         f"e.g. --context-length {min(16, mm.max_len)} --context-overlap 4, "
                         f"or --free-noise")
    if cfg.prompt_interpolation not in prompt_travel.METHODS:
      raise InputError(f"unknown prompt interpolation {cfg.prompt_interpolation!r}; expected one "
                       f"of {prompt_travel.METHODS}")
    if cfg.context_batch is not None and cfg.context_batch < 1:
      raise InputError(f"context_batch must be >= 1, got {cfg.context_batch}")
    if cfg.scheduler not in SAMPLERS:
      raise InputError(f"unknown scheduler {cfg.scheduler!r}; choose from {SAMPLERS}")
    if not 0.0 <= cfg.strength <= 1.0:
      raise InputError(f"strength must be in [0, 1], got {cfg.strength}")
    if cfg.sparse_ctrl is not None:
      if self.sparse_ctrl is None:
        raise InputError("SamplingConfig.sparse_ctrl is set but the pipeline has no SparseCtrl "
                         "(Pipeline(..., sparse_ctrl=(SparseCtrlConfig, params)))")
      n = self.sparse_ctrl.config.motion.max_len
      seen = cfg.context.context_length if cfg.context is not None else cfg.frames
      if min(seen, cfg.frames) > n:
        raise InputError(f"SparseCtrl sees at most {n} frames at once (its positional encoding); "
                         f"got {min(seen, cfg.frames)}: use context windows of <= {n} frames")
    if cfg.controlnets and len(cfg.controlnets) != len(self.controlnets):
      raise InputError(f"SamplingConfig.controlnets has {len(cfg.controlnets)} entries for "
                       f"{len(self.controlnets)} ControlNet(s) in the pipeline")

  # -- SparseCtrl -----------------------------------------------------------------------------
  def sparse_condition(self, images, indices: Sequence[int], cfg: SamplingConfig,
                       key: Optional[jax.Array] = None, vae_noise=None):
    """Keyframe images -> (condition, mask) for `__call__(..., control=)`.

    images (B, K, H, W, 3) in [0, 1] at the video's pixel size (B = 1 is shared by all samples);
    indices: K frame indices (negative count from the end). RGB SparseCtrl: the images are
    VAE-encoded as the official script does, `vae.encode(2x - 1)` *sampled* (not the mean) times
    the scaling factor; the draw comes from `key` (default key 0) or, exactly, from `vae_noise`
    (B, K, h, w, 4) standard-normal. Scribble: the images themselves.
    Returns condition (B, F, h*r, w*r, C) and mask (B, F) (see sparse_ctrl.sparse_condition).
    """
    from adiff_jax.sparse_ctrl import sparse_condition
    if self.sparse_ctrl is None:
      raise InputError("this pipeline has no SparseCtrl")
    images = self._check_frames(images, cfg, "keyframe images", "K")
    if self.sparse_ctrl.config.kind == "rgb":
      images = self.encode_frames(images, cfg, key=key, vae_noise=vae_noise)
    return sparse_condition(images, indices, cfg.frames)

  def _check_frames(self, images, cfg: SamplingConfig, what: str, n: str = "F"):
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 5 or images.shape[2:] != (cfg.height, cfg.width, 3):
      raise InputError(f"{what} must be (B, {n}, {cfg.height}, {cfg.width}, 3) in [0, 1] "
                       f"(the video's size); got {images.shape}")
    return images

  def encode_frames(self, images, cfg: SamplingConfig, key: Optional[jax.Array] = None,
                    vae_noise=None) -> jax.Array:
    """Frames (B, K, H, W, 3) in [0, 1] -> scaled VAE latents (B, K, h, w, 4), float32.

    A *sample* of the posterior, as diffusers' `retrieve_latents` and the official SparseCtrl
    script take: the draw comes from `key` (default key 0) or, exactly, from `vae_noise`
    (B, K, h, w, 4) standard-normal (to reproduce another implementation's draw)."""
    x = (2.0 * self._check_frames(images, cfg, "frames", "K") - 1.0).astype(self.dtype)
    if vae_noise is None:
      z = encode_video(self.vae, {"params": self.params["vae"]}, x,
                       key=jax.random.key(0) if key is None else key, chunk_size=cfg.vae_chunk)
    else:
      from adiff_jax.vae import _encode_frames
      b, k = x.shape[:2]
      eps = jnp.asarray(vae_noise, jnp.float32)
      f = self.config.latent_factor
      want = (b, k, cfg.height // f, cfg.width // f, self.config.vae.latent_channels)
      if eps.shape != want:
        raise InputError(f"vae_noise must be {want}; got {eps.shape}")
      z = _encode_frames(self.vae, {"params": self.params["vae"]}, x.reshape((b * k,) + x.shape[2:]),
                         eps.reshape((b * k,) + eps.shape[2:]), cfg.vae_chunk)
      z = z.reshape((b, k) + z.shape[1:])
    return z.astype(jnp.float32)

  def _controls(self, control, controlnet_frames, batch: int, cfg: SamplingConfig):
    """Call-time control inputs -> (units, per-unit args, per-unit per-frame leaves), or None."""
    units, args, leaves = [], [], []
    sparse = self._check_control(control, batch, cfg)
    if sparse is not None:
      units.append(ControlUnit(self.sparse_ctrl, "sparse"))
      args.append((self.sparse_ctrl_params, jnp.float32(cfg.sparse_ctrl.conditioning_scale)))
      leaves.append((pack_frames(sparse[0]), sparse[1].reshape(sparse[1].shape + (1, 1))))
    frames = list(controlnet_frames or [])
    if len(frames) != len(self.controlnets):
      raise InputError(f"the pipeline has {len(self.controlnets)} ControlNet(s): give one control "
                       f"video each in controlnet_frames (got {len(frames)})")
    settings = cfg.controlnets or (ControlNetSampling(),) * len(frames)
    for k, (net, params, v, st) in enumerate(zip(self.controlnets, self.controlnet_params, frames, settings)):
      v = self._check_frames(v, cfg, f"ControlNet {k}'s control frames")
      if v.shape[1] != cfg.frames or v.shape[0] not in (1, batch):
        raise InputError(f"ControlNet {k}'s control video has {v.shape[1]} frames and batch "
                         f"{v.shape[0]}; this call samples {cfg.frames} frames for {batch} prompt(s)")
      units.append(ControlUnit(net, "controlnet", st.guess_mode))
      args.append((params, jnp.float32(st.conditioning_scale), jnp.float32(st.start), jnp.float32(st.end)))
      leaves.append((pack_frames(jnp.broadcast_to(v, (batch,) + v.shape[1:])),))
    return (tuple(units), tuple(args), tuple(leaves)) if units else None

  def _check_control(self, control, batch: int, cfg: SamplingConfig):
    """(condition, mask) -> both as float32 with the sample batch (B = 1 broadcast)."""
    if (control is None) != (cfg.sparse_ctrl is None):
      raise InputError("SparseCtrl needs both SamplingConfig.sparse_ctrl and control=(condition, mask)")
    if control is None:
      return None
    cond, mask = (jnp.asarray(a, jnp.float32) for a in control)
    f = self.config.latent_factor
    r = self.sparse_ctrl.config.condition_factor
    want = (cfg.frames, cfg.height // f * r, cfg.width // f * r, self.sparse_ctrl.config.conditioning_channels)
    if cond.ndim != 5 or cond.shape[1:] != want or cond.shape[0] not in (1, batch):
      raise InputError(f"SparseCtrl condition must be (B, {', '.join(map(str, want))}) with B = 1 or "
                       f"{batch}; got {cond.shape}")
    if mask.shape not in ((cond.shape[0], cfg.frames),):
      raise InputError(f"SparseCtrl mask must be ({cond.shape[0]}, {cfg.frames}); got {mask.shape}")
    return (jnp.broadcast_to(cond, (batch,) + cond.shape[1:]),
            jnp.broadcast_to(mask, (batch,) + mask.shape[1:]))

  # -- stages ---------------------------------------------------------------------------------
  def encode_prompts(self, prompts: Sequence[prompt_travel.Prompt], clip_skip: int = 1,
                     frames: Optional[int] = None, interpolation: str = "lerp",
                     size: Optional[tuple[int, int]] = None):
    """(B,) prompts -> text context (B, 77, D); with `frames`, per-frame context (B, F, 77, D)
    (travelling prompts {frame: text} interpolated, plain ones repeated).

    SDXL: {"context": (B, 77, 2048), "text_embeds": (B, 1280) pooled, "time_ids": (B, 6)} (both
    encoders' hidden_states[-(clip_skip + 1)]; time ids: original = target = `size` (H, W), no
    crop, as diffusers' defaults); the UNet's text and added conditions in one pytree."""
    if self.config.is_sdxl:
      return self._encode_sdxl(prompts, clip_skip, frames, size)
    if frames is None:
      ids = jnp.asarray(self.tokenizer(list(prompts)))
      return _encode_text(self.text_encoder, self.params["text_encoder"], ids, clip_skip)
    texts = sorted({t for p in prompts for t in prompt_travel.texts(p)})
    embeds = self.encode_prompts(texts, clip_skip)                      # (K, 77, D)
    row = {t: i for i, t in enumerate(texts)}
    return jnp.stack([prompt_travel.per_frame(embeds[jnp.asarray([row[t] for t in prompt_travel.texts(p)])],
                                              p, frames, interpolation) for p in prompts])

  def _encode_sdxl(self, prompts, clip_skip: int, frames, size):
    from adiff_jax.sdxl_text import time_ids
    if frames is not None:
      raise InputError("travelling prompts are not supported with SDXL: its pooled text embedding "
                       "is one per video")
    if size is None:
      raise InputError("SDXL prompts need the video size (H, W) for the UNet's time ids")
    ids, ids_2 = (jnp.asarray(t(list(prompts))) for t in (self.tokenizer, self.tokenizer_2))
    # Our clip_skip counts from 1 = the last layer; diffusers' SDXL default is the penultimate.
    ctx, pooled = _encode_sdxl_jit(self.text_encoder, self.params["text_encoder"], self.text_encoder_2,
                                   self.params["text_encoder_2"], ids, ids_2, int(clip_skip))
    tid = jnp.broadcast_to(jnp.asarray(time_ids(size)), (len(prompts), 6))
    return {"context": ctx, "text_embeds": pooled.astype(ctx.dtype), "time_ids": tid}

  def initial_noise(self, seeds: Sequence[int], cfg: SamplingConfig, stream: int = 0) -> jax.Array:
    """Standard-normal latents (B, F, h, w, C), one independent stream per seed (stream > 0:
    further draws from the same seed, e.g. FreeInit's fresh noise)."""
    f = self.config.latent_factor
    shape = (cfg.frames, cfg.height // f, cfg.width // f, self.config.unet.in_channels)
    key = (lambda s: seed_key(s)) if stream == 0 else (lambda s: jax.random.fold_in(seed_key(s), stream))
    return jnp.stack([jax.random.normal(key(s), shape, jnp.float32) for s in seeds])

  def context_batch(self, cfg: SamplingConfig) -> int:
    """Windows per UNet call: as many as the mesh's data axis has devices, so they run in parallel."""
    if cfg.context_batch is not None:
      return cfg.context_batch
    return 1 if self.mesh is None else int(dict(zip(self.mesh.axis_names, self.mesh.devices.shape))["data"])

  def denoise(self, noise: jax.Array, cond: jax.Array, uncond: jax.Array, cfg: SamplingConfig,
              progress: bool = True, key: Optional[jax.Array] = None, controls=None,
              start: int = 0) -> jax.Array:
    """The whole denoising loop, compiled once per (shape, scheduler, steps, windows, start).
    noise: standard normal (start 0), or latents already noised to step `start` (`noise_to_step`),
    from which steps start..steps-1 run (video-to-video).
    key: the noise a stochastic sampler injects between steps (DDIM eta > 0, LCM).
    controls: (units, args, leaves) of SparseCtrl / ControlNets (`_controls`), or None."""
    sampler = start_at(make_sampler(cfg.scheduler, cfg.schedule, cfg.steps, eta=cfg.eta), start)
    frames = noise.shape[1]
    windowed = cfg.context is not None and frames > cfg.context.context_length
    group = self.context_batch(cfg) if windowed else 1
    loop_key = (cfg.scheduler, cfg.steps, cfg.eta, cfg.schedule, progress, cfg.guided,
                (cfg.context, frames, group) if windowed else None, cfg.free_noise,
                None if controls is None else tuple((u.module, u.kind, u.guess_mode) for u in controls[0]),
                start)
    if loop_key not in self._loops:
      plan = plan_windows(frames, cfg.steps, cfg.context, group) if windowed else None
      self._loops[loop_key] = _make_loop(self.unet_for(cfg.free_noise), sampler, progress,
                                         cfg.guided, plan, group,
                                         units=() if controls is None else controls[0], start=start)
    loop = self._loops[loop_key]
    args = (self.params["unet"], self.lora, noise, cond, uncond,
            jnp.float32(cfg.guidance_scale), jax.random.key(0) if key is None else key)
    if controls is not None:
      args += (controls[1:],)
    if self.mesh is None:
      return loop(*args)
    with jax.set_mesh(self.mesh):
      return loop(*args)

  def decode(self, latents: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Latents (B, F, h, w, 4) -> frames (B, F, H, W, 3) in [0, 1], decoded in frame chunks."""
    x = decode_video(self.vae, {"params": self.params["vae"]}, latents.astype(self.dtype),
                     chunk_size=cfg.vae_chunk)
    return jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

  def __call__(self, prompts: Sequence[prompt_travel.Prompt],
               negative_prompts: Optional[Sequence[prompt_travel.Prompt]] = None,
               seeds: Sequence[int] = (0,), cfg: SamplingConfig = SamplingConfig(),
               noise: Optional[jax.Array] = None, progress: bool = True,
               control: Optional[tuple] = None, init_video=None,
               init_latents: Optional[jax.Array] = None, controlnet_frames=None) -> np.ndarray:
    """Prompts -> frames (B, F, H, W, 3) float32 in [0, 1]. One sample per (prompt, seed) pair.

    A prompt is text or a travelling {frame: text} mapping (negatives too).
    control: SparseCtrl (condition, mask) from `sparse_condition` (with cfg.sparse_ctrl).
    controlnet_frames: one control video (B, F, H, W, 3) in [0, 1] per ControlNet of the
      pipeline (B = 1 is shared), settings in cfg.controlnets.
    init_video: video-to-video: (B, F, H, W, 3) in [0, 1] (B = 1 is shared by all samples),
      VAE-encoded (a posterior sample from key 0, as `encode_frames`), noised to step
      `cfg.start_step()` with each seed's noise; the remaining steps run from there.
      init_latents: the same from already scaled latents (B, F, h, w, 4) instead of a video.
    """
    self.check(cfg)
    prompts = list(prompts)
    negative = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    if len(negative) != len(prompts) or len(seeds) != len(prompts):
      raise InputError(f"need one negative prompt and one seed per prompt: got {len(prompts)} "
                       f"prompts, {len(negative)} negative prompts, {len(seeds)} seeds")
    for p in prompts:
      prompt_travel.check(p, cfg.frames)
    for p in negative:
      prompt_travel.check(p, cfg.frames, "negative prompt")
    controls = self._controls(control, controlnet_frames, len(prompts), cfg)
    start, init_latents = self._init_latents(init_video, init_latents, len(prompts), cfg)
    per_frame = cfg.frames if prompt_travel.is_travelling(prompts + negative) else None
    size = (cfg.height, cfg.width)
    cond = self.encode_prompts(prompts, cfg.clip_skip, per_frame, cfg.prompt_interpolation, size)
    if self.config.is_sdxl and negative_prompts is None:
      # diffusers' force_zeros_for_empty_prompt (SDXL base): no negative prompt -> zero context
      # and pooled text (the time ids stay).
      uncond = dict(cond, context=jnp.zeros_like(cond["context"]),
                    text_embeds=jnp.zeros_like(cond["text_embeds"]))
    else:   # SDXL: diffusers encodes negatives at the penultimate layer whatever clip_skip is
      uncond = self.encode_prompts(negative, 1 if self.config.is_sdxl else cfg.clip_skip, per_frame,
                                   cfg.prompt_interpolation, size)
    if noise is None:
      noise = self.initial_noise(seeds, cfg)
      if cfg.free_noise is not None and init_latents is None:   # each sample's shuffle from its own seed
        noise = jnp.concatenate([reschedule_noise(noise[i:i + 1], cfg.free_noise,
                                                  jax.random.fold_in(seed_key(s), _FREE_NOISE_STREAM))
                                 for i, s in enumerate(seeds)])
    if init_latents is not None:   # video-to-video: the input noised to the first step that runs
      sampler = make_sampler(cfg.scheduler, cfg.schedule, cfg.steps, eta=cfg.eta)
      noise = noise_to_step(sampler, init_latents, noise, start)
    fi = cfg.free_init
    latents, x_start = None, noise
    for it in range(1 if fi is None else fi.iterations):
      if it:   # FreeInit: low frequencies of the last result (re-noised), high ones fresh
        x_start = free_init_lib.reinit(latents, noise, self.initial_noise(seeds, cfg, stream=it),
                                     cfg.schedule, fi)
      steps = cfg.steps if fi is None else free_init_lib.iteration_steps(cfg.steps, it, fi)
      latents = self.denoise(x_start, cond, uncond, dataclasses.replace(cfg, steps=steps), progress,
                             key=jax.random.fold_in(seed_key(seeds[0]), _STEP_NOISE_STREAM + it),
                             controls=controls, start=start)
    if not bool(jnp.isfinite(latents).all()):
      raise FloatingPointError(
          "the denoising loop produced NaN/inf latents (a black video otherwise). Try --dtype f32, "
          "check that the checkpoint converted cleanly (python -m convert_weights inspect ...), "
          "or lower the guidance scale / LoRA alphas.")
    return np.asarray(self.decode(latents, cfg))

  def _init_latents(self, init_video, init_latents, batch: int, cfg: SamplingConfig):
    """Video-to-video inputs -> (start step, scaled latents (B, F, h, w, C) or None)."""
    if init_video is not None and init_latents is not None:
      raise InputError("give init_video or init_latents, not both")
    if init_video is None and init_latents is None:
      return 0, None
    if cfg.free_init is not None:
      raise InputError("FreeInit re-noises its own results: it cannot start from an input video")
    start = cfg.start_step()
    if start >= cfg.steps:
      raise InputError(f"strength {cfg.strength} with {cfg.steps} steps leaves no step to run "
                       f"(int(steps * strength) = 0): raise the strength or the steps")
    if init_video is not None:
      v = self._check_frames(init_video, cfg, "init_video")
      if v.shape[1] != cfg.frames or v.shape[0] not in (1, batch):
        raise InputError(f"init_video has {v.shape[1]} frames and batch {v.shape[0]}; this call "
                         f"samples {cfg.frames} frames for {batch} prompt(s) (batch 1 or {batch})")
      init_latents = self.encode_frames(v, cfg)
    f = self.config.latent_factor
    want = (cfg.frames, cfg.height // f, cfg.width // f, self.config.unet.in_channels)
    z = jnp.asarray(init_latents, jnp.float32)
    if z.ndim != 5 or z.shape[1:] != want or z.shape[0] not in (1, batch):
      raise InputError(f"init_latents must be (B, {', '.join(map(str, want))}) with B = 1 or {batch}; "
                       f"got {z.shape}")
    return start, jnp.broadcast_to(z, (batch,) + want)


# fold_in tags of further draws from a user seed (FreeInit's fresh noise uses 1, 2, ...).
_FREE_NOISE_STREAM = 1 << 20   # FreeNoise's shuffles
_STEP_NOISE_STREAM = 1 << 21   # noise injected between steps (LCM, DDIM eta > 0), + FreeInit iteration


def seed_key(seed: int) -> jax.Array:
  """PRNG key of a user seed; seeds up to 2**64 (the official configs use such) stay distinct."""
  seed = int(seed)
  if not 0 <= seed < 2**64:
    raise InputError(f"seed must be in [0, 2**64), got {seed}")
  return jax.random.fold_in(jax.random.key(seed & 0xFFFFFFFF), seed >> 32)


@functools.partial(jax.jit, static_argnames=("model", "clip_skip"))
def _encode_text(model, params, ids, clip_skip):
  return model.apply({"params": params}, ids, clip_skip=clip_skip)


@functools.partial(jax.jit, static_argnames=("model", "model_2", "clip_skip"))
def _encode_sdxl_jit(model, params, model_2, params_2, ids, ids_2, clip_skip):
  from adiff_jax.sdxl_text import encode_sdxl
  return encode_sdxl(model, params, model_2, params_2, ids, ids_2,
                     None if clip_skip <= 1 else clip_skip - 1)


def _text_and_added(c):
  """Text condition -> (context, added_cond): SD1.5's is the context array; SDXL's a dict that
  also holds the UNet's added conditions (pooled text, time ids)."""
  if not isinstance(c, dict):
    return c, None
  return c["context"], {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}


def _make_loop(unet: UNet3D, sampler, progress: bool, guided: bool = True,
               plan: Optional[WindowPlan] = None, group: int = 1, units: tuple = (), start: int = 0):
  """(unet_params, lora, noise, cond, uncond, guidance, key[, ctrl_args]) -> latents.

  Without progress: the whole loop is one jitted `lax.scan`. With progress: one jitted step
  driven from the host, which advances the bar between steps; nothing calls back to the host
  from inside a compiled program, so every program stays in the persistent compilation cache.
  guided=False: the conditional prediction alone (guidance <= 1), no unconditional half.
  plan: context windows (the step index picks that step's windows), `group` per UNet call.
  units: SparseCtrl / ControlNet units (adiff_jax/control.py); then ctrl_args = (per-unit args,
  per-unit per-frame leaves). They run on the UNet's CFG batch and timestep (text: uncond ++
  cond, as the official pipeline); the per-frame leaves ride in the text context, so windows
  slice them.
  start: the first step that runs; from 0, `noise` is standard normal (times init_noise_sigma),
  else it is already the input of step `start` (video-to-video).
  """
  def begin(noise, key):
    key = key if sampler.stochastic else None
    if start == 0:
      return sample_init(sampler, noise, key=key)
    return noise, sampler.init_state(noise.shape, key=key)

  def guided_eps(params, lora, cond, uncond, guidance, i, ctrl_args=None):
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}

    def model(x, ctx, t):  # x (B', F', h, w, C); ctx (uncond, cond[, control leaves]), text (B', 77, D) or (B', F', 77, D)
      u, c = ctx[:2]
      if guided:           # CFG in one batch: (2B', ...)
        x, c = jnp.concatenate([x, x]), jax.tree.map(lambda a, b: jnp.concatenate([a, b]), u, c)
      c, added = _text_and_added(c)
      tt = jnp.broadcast_to(t, (x.shape[0],))
      res = residuals(units, ctrl_args[0], ctx[2], x, c, tt, i - start, sampler.num_steps - start,
                      guided) if units else {}
      out = unet.apply(variables, x.astype(unet.dtype), tt,
                       c.astype(unet.dtype), added_cond=added, **res).astype(jnp.float32)
      if not guided:
        return out
      e_uncond, e_cond = jnp.split(out, 2)
      return e_uncond + guidance * (e_cond - e_uncond)

    ctx = (uncond, cond) if not units else (uncond, cond, ctrl_args[1])

    def eps_fn(x, t):
      if plan is None:
        return model(x, ctx, t)
      # CFG is linear, so guiding each window and then fusing equals fusing each half first.
      return fused_eps(lambda xw, cw: model(xw, cw, t), x, ctx, plan, i, group)
    return eps_fn

  def whole(params, lora, noise, cond, uncond, guidance, key, ctrl_args=None):
    def body(carry, i):
      x, state = carry
      return sample_step(sampler, guided_eps(params, lora, cond, uncond, guidance, i, ctrl_args),
                         x, state, i), None
    (x, _), _ = jax.lax.scan(body, begin(noise, key), jnp.arange(start, sampler.num_steps))
    return x

  if not progress:
    return jax.jit(whole)

  init = jax.jit(begin)
  step = jax.jit(lambda params, lora, x, state, cond, uncond, guidance, i, ctrl_args=None: sample_step(
      sampler, guided_eps(params, lora, cond, uncond, guidance, i, ctrl_args), x, state, i))

  def stepwise(params, lora, noise, cond, uncond, guidance, key, ctrl_args=None):
    from tqdm.auto import tqdm
    x, state = init(noise, key)
    for i in tqdm(range(start, sampler.num_steps), desc="denoising", unit="step", leave=False):
      x, state = step(params, lora, x, state, cond, uncond, guidance, jnp.int32(i), ctrl_args)
    return x

  return stepwise
