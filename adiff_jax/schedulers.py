"""Noise schedules and samplers (DDIM, Euler, DPM-Solver++ 2M, LCM) in pure JAX.

Everything that depends only on the config and the number of steps (timesteps, alphas, sigmas,
solver coefficients) is precomputed once in NumPy float64 into small per-step tables. The step
functions index those tables with the step number `i`, so `i` may be a traced value and a whole
denoising loop fits in one `jax.lax.scan` / `fori_loop`. Sampler state is a pytree (a dict,
possibly empty) that is passed in and returned, so it can be the scan carry.

Numbers follow diffusers (`DDIMScheduler`, `EulerDiscreteScheduler`,
`DPMSolverMultistepScheduler`, `LCMScheduler`), including their per-scheduler timestep spacing quirks; see
docs/schedulers.md.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from adiff_jax.errors import InputError

Pytree = Any

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddim", "euler", "dpmpp_2m", "lcm")
LCM_DEFAULT_SEED = 0  # the LCM noise key when none is given (see Sampler.init_state)

# ComfyUI / original-SD (ldm) names for the same schedules. Accepting them silently would be a
# trap: ComfyUI "linear" is diffusers "scaled_linear", so we only use them for error hints.
_COMFY_HINT = {
  "sqrt_linear": "ComfyUI/ldm 'sqrt_linear' is diffusers 'linear' (betas linear in beta)",
  "cosine": "ComfyUI/ldm 'cosine' is diffusers 'squaredcos_cap_v2'",
}


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """Training noise schedule plus the inference options that diffusers keeps in the same config.

  Defaults are the official AnimateDiff inference/training config (see `animatediff()`).
  `beta_schedule` uses diffusers names: "linear" = betas linear in beta (AnimateDiff),
  "scaled_linear" = linear in sqrt(beta) (what SD1.5 itself was trained with).
  """
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "linear"
  prediction_type: str = "epsilon"
  steps_offset: int = 1
  timestep_spacing: str = "leading"
  set_alpha_to_one: bool = True
  clip_sample: bool = False  # DDIM and LCM, like diffusers
  clip_sample_range: float = 1.0
  # LCM only (diffusers `LCMScheduler` defaults): the distillation schedule the LCM timesteps are
  # picked from (k = num_train_timesteps // original_inference_steps), and the factor on t in the
  # consistency boundary condition c_skip / c_out.
  original_inference_steps: int = 50
  timestep_scaling: float = 10.0

  def __post_init__(self):
    if self.beta_schedule not in BETA_SCHEDULES:
      hint = _COMFY_HINT.get(self.beta_schedule, "")
      raise InputError(f"unknown beta_schedule {self.beta_schedule!r}; expected one of "
                       f"{BETA_SCHEDULES} (diffusers names){'; ' + hint if hint else ''}")
    if self.prediction_type not in PREDICTION_TYPES:
      raise InputError(f"unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}")
    if self.timestep_spacing not in TIMESTEP_SPACINGS:
      raise InputError(f"unknown timestep_spacing {self.timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}")
    if self.num_train_timesteps < 1:
      raise InputError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
    ois = self.original_inference_steps
    if not isinstance(ois, (int, np.integer)) or isinstance(ois, bool) or not 1 <= ois <= self.num_train_timesteps:
      raise InputError(f"original_inference_steps (LCM) must be an int in [1, {self.num_train_timesteps}] "
                       f"(num_train_timesteps), got {ois!r}")
    ts = self.timestep_scaling
    if isinstance(ts, bool) or not isinstance(ts, (int, float, np.floating, np.integer)) or not (
        math.isfinite(ts) and ts > 0):
      raise InputError(f"timestep_scaling (LCM) must be a finite number > 0, got {ts!r}")

  @classmethod
  def animatediff(cls) -> "NoiseSchedule":
    """Official AnimateDiff config (configs/inference/*.yaml noise_scheduler_kwargs + DDIM
    defaults of diffusers 0.11.1); also what the official train.py uses for the forward process."""
    return cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
               prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
               set_alpha_to_one=True, clip_sample=False)

  @classmethod
  def animatelcm(cls) -> "NoiseSchedule":
    """AnimateLCM's inference config (configs/inference-t2v.yaml noise_scheduler_kwargs): the
    AnimateDiff betas with original_inference_steps 100, so 4 LCM steps are 999, 749, 499, 249."""
    return dataclasses.replace(cls.animatediff(), original_inference_steps=100)

  @classmethod
  def lightning(cls) -> "NoiseSchedule":
    """AnimateDiff-Lightning's sampler settings: Euler with "trailing" spacing on linear betas."""
    return dataclasses.replace(cls.animatediff(), timestep_spacing="trailing")

  @classmethod
  def animatediff_sdxl(cls) -> "NoiseSchedule":
    """The official AnimateDiff `sdxl` branch's sampler settings (used with Euler): scaled-linear
    betas 0.00085..0.020, "leading" spacing, steps_offset 1. (diffusers' AnimateDiffSDXL docs show
    DDIM with other betas: not the official settings.)"""
    return cls(beta_start=0.00085, beta_end=0.020, beta_schedule="scaled_linear", steps_offset=1,
               timestep_spacing="leading", set_alpha_to_one=False)

  @classmethod
  def sd15(cls) -> "NoiseSchedule":
    """SD1.5's own scheduler_config.json (scaled_linear, set_alpha_to_one false)."""
    return cls(beta_schedule="scaled_linear", set_alpha_to_one=False)


# ----------------------------------------------------------------------------------------------
# Schedule tables (NumPy, float64)


def betas(schedule: NoiseSchedule) -> np.ndarray:
  """Betas rounded to float32 exactly where diffusers keeps them in float32, returned as float64."""
  n = schedule.num_train_timesteps
  if schedule.beta_schedule == "linear":
    b = np.linspace(schedule.beta_start, schedule.beta_end, n).astype(np.float32)
  elif schedule.beta_schedule == "scaled_linear":
    # diffusers squares the float32 sqrt-betas in float32.
    r = np.linspace(schedule.beta_start ** 0.5, schedule.beta_end ** 0.5, n).astype(np.float32)
    b = r * r
  else:  # squaredcos_cap_v2 (Nichol & Dhariwal), capped at 0.999, then stored as float32
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    b = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)]).astype(np.float32)
  return b.astype(np.float64)


def alphas_cumprod(schedule: NoiseSchedule) -> np.ndarray:
  """(num_train_timesteps,) float64 cumulative product of alphas.

  alphas = 1 - betas is taken in float32 (as diffusers does); the product is then accumulated in
  float64, so it agrees with diffusers' float32 `alphas_cumprod` to ~1e-6 relative (its own
  float32 cumprod rounding) and is the more accurate of the two.
  """
  a = (np.float32(1.0) - betas(schedule).astype(np.float32)).astype(np.float64)
  return np.cumprod(a)


def _check_steps(schedule: NoiseSchedule, num_steps: int):
  if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool):
    raise InputError(f"num_steps must be an int, got {num_steps!r}")
  if not 1 <= num_steps <= schedule.num_train_timesteps:
    raise InputError(f"num_steps must be in [1, {schedule.num_train_timesteps}] "
                     f"(num_train_timesteps), got {num_steps}")


def _check_range(schedule: NoiseSchedule, t: np.ndarray, what: str):
  if t.min() < 0 or t.max() > schedule.num_train_timesteps - 1:
    raise InputError(f"{what}: timesteps {t.min()}..{t.max()} fall outside [0, "
                     f"{schedule.num_train_timesteps - 1}]; lower num_steps or steps_offset")


def _trailing(n_train: int, num_steps: int) -> np.ndarray:
  # Same values as diffusers' round(arange(N, 0, -N/n)) - 1, without arange's float-step risk of
  # producing an extra element.
  return np.round(n_train - np.arange(num_steps) * (n_train / num_steps)) - 1


def ddim_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
  """(num_steps,) int64 model timesteps for DDIM, descending (diffusers `DDIMScheduler.set_timesteps`).

  "leading" (AnimateDiff / diffusers 0.11.1): arange(n) * (N // n), reversed, + steps_offset;
  25 steps -> 961, 921, ..., 1.
  """
  _check_steps(schedule, num_steps)
  n_train = schedule.num_train_timesteps
  if schedule.timestep_spacing == "leading":
    t = np.arange(num_steps)[::-1] * (n_train // num_steps) + schedule.steps_offset
  elif schedule.timestep_spacing == "trailing":
    t = _trailing(n_train, num_steps)
  else:
    t = np.round(np.linspace(0, n_train - 1, num_steps))[::-1]
  t = t.astype(np.int64)
  _check_range(schedule, t, "ddim")
  return t


def ddim_tables(schedule: NoiseSchedule, num_steps: int) -> dict[str, np.ndarray]:
  """Per-step DDIM arrays: timesteps (int32), alpha_t and alpha_prev (float32 alphas_cumprod).

  The previous timestep is t - N // n whatever the spacing (as in diffusers, even where this is
  not the next timestep of a "trailing"/"linspace" schedule); below 0 it uses the final alpha,
  1.0 with set_alpha_to_one, else alphas_cumprod[0].
  """
  t = ddim_timesteps(schedule, num_steps)
  acp = alphas_cumprod(schedule)
  final = 1.0 if schedule.set_alpha_to_one else acp[0]
  prev = t - schedule.num_train_timesteps // num_steps
  alpha_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], final)
  return {"timesteps": t.astype(np.int32), "alpha_t": acp[t].astype(np.float32),
          "alpha_prev": alpha_prev.astype(np.float32)}


def _predict_x0_eps(schedule: NoiseSchedule, out, x, alpha):
  """(x0, eps) from a model output at x = sqrt(alpha) x0 + sqrt(1 - alpha) eps."""
  sa, sb = jnp.sqrt(alpha), jnp.sqrt(1.0 - alpha)
  if schedule.prediction_type == "epsilon":
    return (x - sb * out) / sa, out
  if schedule.prediction_type == "v_prediction":
    return sa * x - sb * out, sa * out + sb * x
  return out, (x - sa * out) / sb  # "sample"


def ddim_step(schedule: NoiseSchedule, eps, i, x_t, tables: Mapping[str, Any], *,
              eta: float = 0.0, key: Optional[jax.Array] = None, noise=None):
  """One DDIM update x_t -> x_prev at step number `i` (may be traced) of `ddim_tables(...)`.

  `eps` is the model output (epsilon, or v / x0 per `schedule.prediction_type`). With eta > 0
  (a Python float) pass `key` or the standard-normal `noise` itself. Computes in float32 and
  returns x_t's dtype.
  """
  dtype = x_t.dtype
  x = x_t.astype(jnp.float32)
  out = eps.astype(jnp.float32)
  a_t = jnp.asarray(tables["alpha_t"], jnp.float32)[i]
  a_prev = jnp.asarray(tables["alpha_prev"], jnp.float32)[i]
  x0, pred_eps = _predict_x0_eps(schedule, out, x, a_t)
  if schedule.clip_sample:
    # diffusers clips x0 only; the direction term keeps the unclipped eps.
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  var = jnp.zeros((), jnp.float32)
  if eta:
    # sigma_t(eta)^2 of DDIM eq. 16; zero at the last step when alpha_prev is 1.
    var = eta * eta * (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
  x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - var) * pred_eps
  if eta:
    if noise is None:
      if key is None:
        raise InputError("ddim_step: eta > 0 needs a PRNG `key` (or `noise`)")
      noise = jax.random.normal(key, x.shape, jnp.float32)
    x_prev = x_prev + jnp.sqrt(var) * noise.astype(jnp.float32)
  return x_prev.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Euler and DPM-Solver++ tables


def _sigmas_train(schedule: NoiseSchedule) -> np.ndarray:
  acp = alphas_cumprod(schedule)
  return np.sqrt((1.0 - acp) / acp)


def euler_tables(schedule: NoiseSchedule, num_steps: int) -> dict[str, np.ndarray]:
  """`EulerDiscreteScheduler` (default interpolation, no Karras, final sigma 0): float32
  timesteps (fractional with "linspace"), sigmas (num_steps + 1) linearly interpolated in t."""
  _check_steps(schedule, num_steps)
  n_train = schedule.num_train_timesteps
  if schedule.timestep_spacing == "leading":
    t = (np.arange(num_steps)[::-1] * (n_train // num_steps)).astype(np.float32) + schedule.steps_offset
  elif schedule.timestep_spacing == "trailing":
    t = _trailing(n_train, num_steps).astype(np.float32)
  else:  # no rounding here, unlike DDIM
    t = np.linspace(0, n_train - 1, num_steps, dtype=np.float32)[::-1].copy()
  _check_range(schedule, t, "euler")
  s = np.interp(t.astype(np.float64), np.arange(n_train), _sigmas_train(schedule))
  return {"timesteps": t.astype(np.float32),
          "sigmas": np.concatenate([s, [0.0]]).astype(np.float32)}


def dpm_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
  """(num_steps,) int64 timesteps of `DPMSolverMultistepScheduler`. Its "leading" and "linspace"
  use num_steps + 1 points and drop the last, so they differ from DDIM's (25 leading steps:
  951, 913, ..., 39 instead of 961, ..., 1)."""
  _check_steps(schedule, num_steps)
  n_train = schedule.num_train_timesteps
  if schedule.timestep_spacing == "leading":
    t = (np.arange(num_steps + 1)[::-1] * (n_train // (num_steps + 1)))[:-1] + schedule.steps_offset
  elif schedule.timestep_spacing == "trailing":
    t = _trailing(n_train, num_steps)
  else:
    t = np.round(np.linspace(0, n_train - 1, num_steps + 1))[::-1][:-1]
  t = t.astype(np.int64)
  _check_range(schedule, t, "dpmpp_2m")
  return t


def dpm_tables(schedule: NoiseSchedule, num_steps: int) -> dict[str, np.ndarray]:
  """DPM-Solver++ (2M, midpoint, lower_order_final, final sigma 0) as per-step coefficients.

  With sigma = sqrt((1 - acp) / acp), alpha = 1 / sqrt(1 + sigma^2), s = sigma * alpha and
  lambda = -log(sigma), step i maps x and the data predictions m0 = x0_i, m1 = x0_{i-1} to
      x' = cx * x + c0 * m0 + c1 * (m0 - m1).
  Precomputing keeps the final step (sigma 0, lambda = inf) free of inf/nan inside the jitted
  loop: exp(-h) = sigma_next / sigma_i exactly. First order at step 0 and at the last step.
  """
  t = dpm_timesteps(schedule, num_steps)
  sig = np.concatenate([_sigmas_train(schedule)[t].astype(np.float32), [0.0]]).astype(np.float64)
  alpha = 1.0 / np.sqrt(1.0 + sig ** 2)
  s = sig * alpha
  cx, c0, c1 = (np.zeros(num_steps) for _ in range(3))
  for i in range(num_steps):
    cx[i] = s[i + 1] / s[i]
    c0[i] = alpha[i + 1] * (1.0 - sig[i + 1] / sig[i])  # -alpha_t (exp(-h) - 1)
    if 0 < i < num_steps - 1:
      r0 = np.log(sig[i - 1] / sig[i]) / np.log(sig[i] / sig[i + 1])  # h_{i-1} / h_i
      c1[i] = 0.5 * c0[i] / r0
  f32 = lambda a: a.astype(np.float32)
  return {"timesteps": t.astype(np.int32), "alpha": f32(alpha[:-1]), "sigma_t": f32(s[:-1]),
          "cx": f32(cx), "c0": f32(c0), "c1": f32(c1)}


# ----------------------------------------------------------------------------------------------
# LCM (latent consistency model) tables


def lcm_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
  """(num_steps,) int64 timesteps of `LCMScheduler.set_timesteps` (strength 1).

  The distillation schedule is k - 1, 2k - 1, ..., N - 1 with k = N // original_inference_steps;
  reversed, `num_steps` of its entries are taken at indices floor(linspace(0, len, num_steps,
  endpoint=False)). timestep_spacing and steps_offset do not apply. AnimateLCM (original 100),
  4 steps: 999, 749, 499, 249; the diffusers default (original 50): 999, 759, 499, 259.
  """
  _check_steps(schedule, num_steps)
  original = schedule.original_inference_steps
  if num_steps > original:
    raise InputError(f"lcm: {num_steps} steps exceed original_inference_steps {original}: LCM picks "
                     f"its timesteps from that many distillation steps; lower the steps or raise "
                     f"original_inference_steps")
  k = schedule.num_train_timesteps // original
  origin = (np.arange(1, original + 1) * k - 1)[::-1]
  idx = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
  t = origin[idx].astype(np.int64)
  _check_range(schedule, t, "lcm")
  return t


def lcm_tables(schedule: NoiseSchedule, num_steps: int) -> dict[str, np.ndarray]:
  """Per-step LCM arrays (float32 unless noted):

  timesteps (int32); alpha_t = alphas_cumprod[t]; c_skip, c_out: the consistency boundary
  condition at t (sigma_data 0.5, s = t * timestep_scaling: c_skip = 0.25 / (s^2 + 0.25),
  c_out = s / sqrt(s^2 + 0.25)); a_next, s_next: sqrt(acp), sqrt(1 - acp) of the next timestep,
  the scales of the denoised sample and of the fresh noise (1 and 0 at the last step, which
  injects no noise).
  """
  t = lcm_timesteps(schedule, num_steps)
  acp = alphas_cumprod(schedule)
  s = t.astype(np.float64) * schedule.timestep_scaling
  acp_next = np.concatenate([acp[t[1:]], [1.0]])
  f32 = lambda a: np.asarray(a).astype(np.float32)
  return {"timesteps": t.astype(np.int32), "alpha_t": f32(acp[t]),
          "c_skip": f32(0.25 / (s * s + 0.25)), "c_out": f32(s / np.sqrt(s * s + 0.25)),
          "a_next": f32(np.sqrt(acp_next)), "s_next": f32(np.sqrt(1.0 - acp_next))}


def lcm_noise(key: jax.Array, i, shape) -> jax.Array:
  """The standard-normal noise the LCM sampler injects after step i: one independent draw per
  step, normal(fold_in(key, i)); the key stays the same through the loop."""
  return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)


def lcm_step(schedule: NoiseSchedule, out, i, x_in, tables: Mapping[str, Any], noise):
  """One LCM step at step number i (may be traced): the denoised sample
  c_out * x0 + c_skip * x, then re-noised to the next timestep with `noise` (standard normal)
  as a_next * denoised + s_next * noise (the last step returns the denoised sample).
  Computes in float32 and returns x's dtype."""
  tab = {k: jnp.asarray(v)[i] for k, v in tables.items() if k != "timesteps"}
  x, out = x_in.astype(jnp.float32), out.astype(jnp.float32)
  x0, _ = _predict_x0_eps(schedule, out, x, tab["alpha_t"])
  if schedule.clip_sample:
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  denoised = tab["c_out"] * x0 + tab["c_skip"] * x
  x_next = tab["a_next"] * denoised + tab["s_next"] * noise.astype(jnp.float32)
  return x_next.astype(x_in.dtype)


# ----------------------------------------------------------------------------------------------
# Common sampler interface


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
  """A sampler for a fixed number of steps. Build it with `make_sampler`.

  Loop (python or inside jit/scan, `i` may be traced):
      x = noise * sampler.init_noise_sigma; state = sampler.init_state(x.shape)
      for i in range(sampler.num_steps):
        eps = model(sampler.scale_model_input(state, x, i), sampler.timestep(i))
        x, state = sampler.step(state, eps, i, x)
  `eq=False`: hashable by identity, so it can also be a static jit argument.
  """
  name: str
  schedule: NoiseSchedule
  num_steps: int
  timesteps: np.ndarray  # model timesteps, one per step
  init_noise_sigma: float
  tables: Mapping[str, np.ndarray]
  eta: float = 0.0

  @property
  def stochastic(self) -> bool:
    """Whether the steps draw noise (DDIM with eta > 0, LCM): then init_state takes a key."""
    return self.name == "lcm" or (self.name == "ddim" and bool(self.eta))

  def init_state(self, latents_shape, key: Optional[jax.Array] = None) -> Pytree:
    """Scan-carry state: {} (DDIM eta 0, Euler), {"key"} (DDIM eta > 0, LCM), {"prev_x0"} (DPM++ 2M).

    LCM without a key uses jax.random.key(LCM_DEFAULT_SEED): the injected noise is then the
    same on every call (the initial noise still differs per seed); pass a key to vary it."""
    if self.name == "dpmpp_2m":
      return {"prev_x0": jnp.zeros(latents_shape, jnp.float32)}
    if self.name == "lcm":
      return {"key": jax.random.key(LCM_DEFAULT_SEED) if key is None else key}
    if self.name == "ddim" and self.eta:
      if key is None:
        raise InputError("ddim with eta > 0 needs init_state(..., key=PRNGKey)")
      return {"key": key}
    return {}

  def timestep(self, i):
    """Model timestep at step i (int32 for DDIM / DPM++ / LCM, float32 for Euler)."""
    return jnp.asarray(self.timesteps)[i]

  def scale_model_input(self, state: Pytree, x, i):
    del state
    if self.name != "euler":
      return x
    sigma = jnp.asarray(self.tables["sigmas"])[i]
    return (x.astype(jnp.float32) / jnp.sqrt(sigma * sigma + 1.0)).astype(x.dtype)

  def step(self, state: Pytree, eps, i, x):
    """x at step i -> x at step i + 1; returns (x, state)."""
    if self.name == "ddim":
      if self.eta:
        key, sub = jax.random.split(state["key"])
        return ddim_step(self.schedule, eps, i, x, self.tables, eta=self.eta, key=sub), {"key": key}
      return ddim_step(self.schedule, eps, i, x, self.tables), state
    if self.name == "euler":
      return _euler_step(self.schedule, eps, i, x, self.tables), state
    if self.name == "lcm":
      noise = lcm_noise(state["key"], i, x.shape)
      return lcm_step(self.schedule, eps, i, x, self.tables, noise), state
    return _dpm_step(self.schedule, state, eps, i, x, self.tables)


def _euler_step(schedule: NoiseSchedule, out, i, x_in, tables):
  sigmas = jnp.asarray(tables["sigmas"])
  sigma, sigma_next = sigmas[i], sigmas[i + 1]
  x, out = x_in.astype(jnp.float32), out.astype(jnp.float32)
  if schedule.prediction_type == "epsilon":
    d = out  # (x - x0) / sigma with x0 = x - sigma * eps
  else:
    if schedule.prediction_type == "v_prediction":
      x0 = out * (-sigma / jnp.sqrt(sigma * sigma + 1.0)) + x / (sigma * sigma + 1.0)
    else:
      x0 = out
    d = (x - x0) / sigma
  return (x + d * (sigma_next - sigma)).astype(x_in.dtype)


def _dpm_step(schedule: NoiseSchedule, state, out, i, x_in, tables):
  tab = {k: jnp.asarray(v)[i] for k, v in tables.items() if k != "timesteps"}
  x, out = x_in.astype(jnp.float32), out.astype(jnp.float32)
  alpha, s = tab["alpha"], tab["sigma_t"]
  if schedule.prediction_type == "epsilon":
    x0 = (x - s * out) / alpha
  elif schedule.prediction_type == "v_prediction":
    x0 = alpha * x - s * out
  else:
    x0 = out
  x_next = tab["cx"] * x + tab["c0"] * x0 + tab["c1"] * (x0 - state["prev_x0"])
  return x_next.astype(x_in.dtype), {"prev_x0": x0}


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int, *, eta: float = 0.0) -> Sampler:
  """Sampler "ddim" | "euler" | "dpmpp_2m" | "lcm" for `num_steps` steps (eta: DDIM only).
  LCM reads original_inference_steps and timestep_scaling from the schedule."""
  if name not in SAMPLERS:
    raise InputError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
  if eta < 0:
    raise InputError(f"eta must be >= 0, got {eta}")
  if eta and name != "ddim":
    raise InputError(f"eta is only supported by ddim, not {name!r}")
  if name == "ddim":
    tables = ddim_tables(schedule, num_steps)
    sigma0 = 1.0
  elif name == "euler":
    tables = euler_tables(schedule, num_steps)
    smax = float(tables["sigmas"].max())
    # diffusers: variance-exploding x_T has std sigma_max; "leading" starts below t = N - 1, so it
    # uses sqrt(sigma^2 + 1) there.
    sigma0 = math.sqrt(smax * smax + 1.0) if schedule.timestep_spacing == "leading" else smax
  elif name == "lcm":
    tables = lcm_tables(schedule, num_steps)
    sigma0 = 1.0
  else:
    tables = dpm_tables(schedule, num_steps)
    sigma0 = 1.0
  return Sampler(name=name, schedule=schedule, num_steps=num_steps, timesteps=tables["timesteps"],
                 init_noise_sigma=sigma0, tables=tables, eta=float(eta))


def noise_to_step(sampler: Sampler, x0, noise, start: int):
  """Clean latents x0 noised to the input of step `start` (video-to-video, img2img): what
  diffusers' `scheduler.add_noise(x0, noise, timesteps[start])` gives for this sampler. Euler
  (variance exploding): x0 + sigma * noise; the others: the DDPM forward process at that step's
  timestep. Unlike `sample_init`, no init_noise_sigma factor (diffusers adds none either)."""
  if not 0 <= start < sampler.num_steps:
    raise InputError(f"start step {start} outside [0, {sampler.num_steps})")
  if sampler.name == "euler":
    sigma = float(sampler.tables["sigmas"][start])
    return (x0.astype(jnp.float32) + sigma * noise.astype(jnp.float32)).astype(x0.dtype)
  return add_noise(sampler.schedule, x0, noise, int(sampler.timesteps[start]))


def start_at(sampler: Sampler, start: int) -> Sampler:
  """The sampler as it runs when its first executed step is `start` (video-to-video). Only
  DPM++ 2M changes: it has no previous prediction there, so that step is first order, as in
  diffusers (model_outputs is empty at the first step it takes)."""
  if start == 0 or sampler.name != "dpmpp_2m":
    return sampler
  c1 = np.array(sampler.tables["c1"])
  c1[start] = 0.0
  return dataclasses.replace(sampler, tables={**sampler.tables, "c1": c1})


def sample_init(sampler: Sampler, noise, *, key: Optional[jax.Array] = None):
  """(x, state) before the first step: `noise` (standard normal) times `init_noise_sigma`."""
  x = (noise.astype(jnp.float32) * sampler.init_noise_sigma).astype(noise.dtype)
  return x, sampler.init_state(noise.shape, key=key)


def sample_step(sampler: Sampler, eps_fn: Callable, x, state, i):
  """One denoising step i (may be traced): eps_fn(x_in, t) -> model output. Returns (x, state)."""
  eps = eps_fn(sampler.scale_model_input(state, x, i), sampler.timestep(i))
  return sampler.step(state, eps, i, x)


def sample(sampler: Sampler, eps_fn: Callable, noise, *, key: Optional[jax.Array] = None):
  """Whole denoising loop as one `lax.scan` of `sample_step`. Returns x_0.

  jit the caller (or this with `sampler` static / closed over).
  """
  carry = sample_init(sampler, noise, key=key)
  (x, _), _ = jax.lax.scan(lambda c, i: (sample_step(sampler, eps_fn, *c, i), None), carry,
                           jnp.arange(sampler.num_steps))
  return x


# ----------------------------------------------------------------------------------------------
# Training


def _at(table: np.ndarray, t, ndim: int):
  v = jnp.asarray(table, jnp.float32)[jnp.asarray(t)]
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def add_noise(schedule: NoiseSchedule, x0, noise, t):
  """x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) noise; t (B,) int broadcast over (B, ...) arrays
  (or a scalar t). Computes in float32, returns x0's dtype."""
  acp = alphas_cumprod(schedule)
  a = _at(np.sqrt(acp), t, x0.ndim)
  b = _at(np.sqrt(1.0 - acp), t, x0.ndim)
  return (a * x0.astype(jnp.float32) + b * noise.astype(jnp.float32)).astype(x0.dtype)


def get_velocity(schedule: NoiseSchedule, x0, noise, t):
  """v = sqrt(acp_t) noise - sqrt(1 - acp_t) x0 (v-prediction target)."""
  acp = alphas_cumprod(schedule)
  a = _at(np.sqrt(acp), t, x0.ndim)
  b = _at(np.sqrt(1.0 - acp), t, x0.ndim)
  return (a * noise.astype(jnp.float32) - b * x0.astype(jnp.float32)).astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0, noise, t):
  """What the model should predict at (x_t, t) for the schedule's prediction_type."""
  if schedule.prediction_type == "epsilon":
    return noise
  if schedule.prediction_type == "v_prediction":
    return get_velocity(schedule, x0, noise, t)
  return x0


def min_snr_weight(schedule: NoiseSchedule, t, gamma: float):
  """Min-SNR-gamma loss weight per timestep (Hang et al. 2023), for the schedule's target:
  min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v_prediction), / 1 (sample); SNR = acp / (1 - acp).
  Low-noise steps, which dominate the plain MSE, are down-weighted."""
  acp = alphas_cumprod(schedule)
  snr = acp / (1.0 - acp)
  denom = {"epsilon": snr, "v_prediction": snr + 1.0}.get(schedule.prediction_type, np.ones_like(snr))
  return jnp.asarray((np.minimum(snr, gamma) / denom).astype(np.float32))[t]


def v_space_weight(schedule: NoiseSchedule, t):
  """1 / acp_t: an epsilon-prediction MSE times this equals the MSE of the implied v prediction
  (v error = eps error / sqrt(acp_t)). Weights high-noise steps up to ~200x (t = 999)."""
  return jnp.asarray((1.0 / alphas_cumprod(schedule)).astype(np.float32))[t]


def sample_timesteps(key: jax.Array, batch: int, num_train_timesteps: int = 1000, low: int = 0):
  """(batch,) int32 timesteps uniform in [low, num_train_timesteps) (official: low = 0)."""
  if not 0 <= low < num_train_timesteps:
    raise InputError(f"lowest training timestep {low} outside [0, {num_train_timesteps})")
  return jax.random.randint(key, (batch,), low, num_train_timesteps, dtype=jnp.int32)
