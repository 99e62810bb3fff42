"""Schedulers: hand-computed tables, whole-loop parity with diffusers, scan/jit, training helpers."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from adiff_jax import schedulers as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# diffusers' own numpy-2 DeprecationWarnings are noise here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

OFFICIAL = S.NoiseSchedule.animatediff()
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)


def _rel(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(b).max())


# Deterministic fake model, nonlinear in x and t so errors compound over the loop.
def _fake_np(x, t):
  return 0.1 * x + 0.1 * np.sin(x + 0.01 * t)


def _fake_jax(x, t):
  return 0.1 * x + 0.1 * jnp.sin(x + 0.01 * t.astype(jnp.float32))


def _latents(shape=(1, 4, 8, 8)):
  return np.random.RandomState(0).randn(*shape).astype(np.float32)


def _diffusers_loop(sched, num_steps, x, noises=None):
  sched.set_timesteps(num_steps)
  x = torch.from_numpy(x) * sched.init_noise_sigma
  lcm, step = isinstance(sched, diffusers.LCMScheduler), [0]
  if lcm:  # LCM draws noise after each step: hand it ours (the default key's draw at step k)
    from diffusers.schedulers import scheduling_lcm
    saved = scheduling_lcm.randn_tensor
    key = jax.random.key(S.LCM_DEFAULT_SEED)
    scheduling_lcm.randn_tensor = lambda shape, **kw: torch.from_numpy(
        np.array(S.lcm_noise(key, step[0], tuple(shape))))
  try:
    for k, t in enumerate(sched.timesteps):
      xin = sched.scale_model_input(x, t)
      eps = torch.from_numpy(_fake_np(xin.numpy(), float(t)).astype(np.float32))
      kw = {} if noises is None else dict(eta=1.0, variance_noise=torch.tensor(noises[k]))
      step[0] = k
      x = sched.step(eps, t, x, **kw).prev_sample
  finally:
    if lcm:
      scheduling_lcm.randn_tensor = saved
  return x.numpy(), sched


def _our_loop(sampler, x, key=None):
  x = jnp.asarray(x) * sampler.init_noise_sigma
  state = sampler.init_state(x.shape, key=key)
  for i in range(sampler.num_steps):
    eps = _fake_jax(sampler.scale_model_input(state, x, i), sampler.timestep(i))
    x, state = sampler.step(state, eps, i, x)
  return np.asarray(x)


def _reference(name, schedule: S.NoiseSchedule):
  kw = dict(BETAS, beta_schedule=schedule.beta_schedule, steps_offset=schedule.steps_offset,
            timestep_spacing=schedule.timestep_spacing, prediction_type=schedule.prediction_type)
  if name == "ddim":
    return diffusers.DDIMScheduler(**kw, clip_sample=schedule.clip_sample,
                                   set_alpha_to_one=schedule.set_alpha_to_one)
  if name == "euler":
    return diffusers.EulerDiscreteScheduler(**kw)
  if name == "lcm":
    return diffusers.LCMScheduler(**kw, clip_sample=schedule.clip_sample,
                                  set_alpha_to_one=schedule.set_alpha_to_one,
                                  original_inference_steps=schedule.original_inference_steps,
                                  timestep_scaling=schedule.timestep_scaling)
  return diffusers.DPMSolverMultistepScheduler(**kw)  # defaults: order 2, dpmsolver++, midpoint


# --- (a) tables computed by hand -------------------------------------------------------------

def test_official_preset():
  s = S.NoiseSchedule.animatediff()
  assert (s.num_train_timesteps, s.beta_start, s.beta_end, s.beta_schedule) == (1000, 0.00085, 0.012, "linear")
  assert (s.steps_offset, s.timestep_spacing, s.set_alpha_to_one, s.clip_sample, s.prediction_type) == (
    1, "leading", True, False, "epsilon")
  assert s == S.NoiseSchedule()


def test_alphas_cumprod_by_hand():
  betas = np.linspace(0.00085, 0.012, 1000, dtype=np.float32)
  acp = S.alphas_cumprod(OFFICIAL)
  assert acp.shape == (1000,) and acp.dtype == np.float64
  for t in (0, 1, 40, 499, 961, 999):
    hand = np.prod(1.0 - betas[: t + 1].astype(np.float64))
    assert abs(acp[t] - hand) / hand < 1e-6, t
  assert abs(acp[0] - (1 - 0.00085)) < 1e-7  # 1 - beta is rounded to float32, as in diffusers
  # scaled_linear (SD1.5): linear in sqrt(beta)
  sl = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
  acp_sl = S.alphas_cumprod(S.NoiseSchedule.sd15())
  assert abs(acp_sl[999] - np.prod(1 - sl)) / np.prod(1 - sl) < 1e-5
  assert acp_sl[999] > acp[999] * 1.5  # the two schedules are far apart at high t


@pytest.mark.parametrize("beta_schedule", S.BETA_SCHEDULES)
def test_alphas_cumprod_vs_diffusers(beta_schedule):
  ref = diffusers.DDIMScheduler(**BETAS, beta_schedule=beta_schedule).alphas_cumprod.numpy()
  ours = S.alphas_cumprod(S.NoiseSchedule(beta_schedule=beta_schedule))
  assert _rel(ours, ref) < 2e-6 and np.abs(ours / ref - 1).max() < 2e-6


def test_ddim_timesteps_and_alphas_by_hand():
  tab = S.ddim_tables(OFFICIAL, 25)
  expected = np.array([961 - 40 * k for k in range(25)])  # step_ratio = 1000 // 25 = 40
  assert expected[0] == 961 and expected[-1] == 1
  np.testing.assert_array_equal(S.ddim_timesteps(OFFICIAL, 25), expected)
  np.testing.assert_array_equal(tab["timesteps"], expected)
  acp = S.alphas_cumprod(OFFICIAL)
  np.testing.assert_allclose(tab["alpha_t"], acp[expected], rtol=1e-6)
  np.testing.assert_allclose(tab["alpha_prev"][:-1], acp[expected[:-1] - 40], rtol=1e-6)
  assert tab["alpha_prev"][-1] == 1.0  # prev = 1 - 40 < 0 and set_alpha_to_one
  no_one = S.ddim_tables(S.NoiseSchedule(set_alpha_to_one=False), 25)
  np.testing.assert_allclose(no_one["alpha_prev"][-1], acp[0], rtol=1e-7)
  # other step counts: 1000 // n, leading + offset
  np.testing.assert_array_equal(S.ddim_timesteps(OFFICIAL, 3), [667, 334, 1])
  np.testing.assert_array_equal(S.ddim_timesteps(OFFICIAL, 1), [1])


@pytest.mark.parametrize("spacing", S.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 3, 7, 25, 50, 999])
def test_timesteps_match_diffusers(spacing, num_steps):
  sched = S.NoiseSchedule(timestep_spacing=spacing)
  for name, fn in (("ddim", S.ddim_timesteps), ("dpmpp_2m", S.dpm_timesteps),
                   ("euler", lambda s, n: S.euler_tables(s, n)["timesteps"])):
    if name == "dpmpp_2m" and spacing == "leading" and num_steps == 999:
      with pytest.raises(ValueError, match="outside"):  # N // (n + 1) = 1 -> t up to 1000
        fn(sched, num_steps)
      continue
    ref = _reference(name, sched)
    ref.set_timesteps(num_steps)
    np.testing.assert_array_equal(fn(sched, num_steps), ref.timesteps.numpy(), err_msg=name)


def test_dpm_leading_differs_from_ddim():
  # DPMSolverMultistepScheduler's "leading" uses N // (n + 1): a real trap when swapping samplers.
  np.testing.assert_array_equal(S.dpm_timesteps(OFFICIAL, 25), [951 - 38 * k for k in range(25)])


# --- (b, c) whole-loop parity with diffusers ------------------------------------------------

@pytest.mark.parametrize("name", S.SAMPLERS)
def test_official_config_loop_parity(name):
  x = _latents()
  ref, ref_sched = _diffusers_loop(_reference(name, OFFICIAL), 25, x)
  sampler = S.make_sampler(name, OFFICIAL, 25)
  np.testing.assert_allclose(sampler.init_noise_sigma, float(ref_sched.init_noise_sigma), rtol=1e-6)
  ours = _our_loop(sampler, x)
  assert _rel(ours, ref) < 1e-5, _rel(ours, ref)


@pytest.mark.parametrize("name", S.SAMPLERS)
@pytest.mark.parametrize("schedule,num_steps", [
  (S.NoiseSchedule(timestep_spacing="trailing"), 10),
  (S.NoiseSchedule(timestep_spacing="linspace"), 20),
  (S.NoiseSchedule.sd15(), 30),
  (S.NoiseSchedule(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"), 8),
  (S.NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing"), 16),
  (S.NoiseSchedule(), 1),
  (S.NoiseSchedule(), 2),
])
def test_loop_parity_variants(name, schedule, num_steps):
  x = _latents((2, 4, 4, 4))
  ref, _ = _diffusers_loop(_reference(name, schedule), num_steps, x)
  ours = _our_loop(S.make_sampler(name, schedule, num_steps), x)
  assert _rel(ours, ref) < 1e-5, _rel(ours, ref)


def test_ddim_clip_sample_parity():
  sched = S.NoiseSchedule(clip_sample=True)
  x = _latents() * 3
  ref, _ = _diffusers_loop(_reference("ddim", sched), 25, x)
  assert _rel(_our_loop(S.make_sampler("ddim", sched, 25), x), ref) < 1e-5


def test_ddim_eta_parity():
  # Reproduce the sampler's key stream outside, hand the same noise to diffusers.
  x, n, key = _latents(), 25, jax.random.PRNGKey(3)
  noises, k = [], key
  for _ in range(n):
    k, sub = jax.random.split(k)
    noises.append(np.asarray(jax.random.normal(sub, x.shape, jnp.float32)))
  ref, _ = _diffusers_loop(_reference("ddim", OFFICIAL), n, x, noises=noises)
  sampler = S.make_sampler("ddim", OFFICIAL, n, eta=1.0)
  ours = _our_loop(sampler, x, key=key)
  assert _rel(ours, ref) < 1e-5, _rel(ours, ref)
  assert _rel(ours, _our_loop(S.make_sampler("ddim", OFFICIAL, n), x)) > 1e-2  # noise did something


def test_ddim_step_function_direct():
  # The bare function with tables as jnp arrays, t index traced.
  tab = {k: jnp.asarray(v) for k, v in S.ddim_tables(OFFICIAL, 25).items()}
  x = jnp.asarray(_latents())
  eps = _fake_jax(x, tab["timesteps"][0])
  got = jax.jit(lambda e, i, x: S.ddim_step(OFFICIAL, e, i, x, tab))(eps, 0, x)
  a_t, a_p = float(tab["alpha_t"][0]), float(tab["alpha_prev"][0])
  x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
  np.testing.assert_allclose(got, np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps, rtol=1e-5, atol=1e-6)


# --- (d) training helpers ---------------------------------------------------------------------

def test_add_noise_by_hand():
  rng = np.random.RandomState(1)
  x0 = rng.randn(3, 2, 4, 4, 4).astype(np.float32)
  noise = rng.randn(*x0.shape).astype(np.float32)
  t = np.array([0, 500, 999])
  got = np.asarray(S.add_noise(OFFICIAL, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
  betas = np.linspace(0.00085, 0.012, 1000, dtype=np.float32).astype(np.float64)
  for b, tb in enumerate(t):
    acp = np.prod(1 - betas[: tb + 1])
    np.testing.assert_allclose(got[b], np.sqrt(acp) * x0[b] + np.sqrt(1 - acp) * noise[b], rtol=1e-5, atol=1e-6)
  ref = _reference("ddim", OFFICIAL).add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)
  # bf16 in, bf16 out; scalar t broadcasts
  assert S.add_noise(OFFICIAL, jnp.asarray(x0, jnp.bfloat16), jnp.asarray(noise), 10).dtype == jnp.bfloat16


def test_velocity_and_target():
  rng = np.random.RandomState(2)
  x0, noise = rng.randn(2, 4, 3).astype(np.float32), rng.randn(2, 4, 3).astype(np.float32)
  t = np.array([3, 700])
  ref = _reference("ddim", OFFICIAL).get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  v = S.get_velocity(OFFICIAL, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  np.testing.assert_allclose(v, ref.numpy(), rtol=1e-5, atol=1e-6)
  assert S.training_target(OFFICIAL, x0, noise, t) is noise
  vs = S.NoiseSchedule(prediction_type="v_prediction")
  np.testing.assert_allclose(S.training_target(vs, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), v)


def test_sample_timesteps():
  t = S.sample_timesteps(jax.random.PRNGKey(0), 4096)
  assert t.shape == (4096,) and t.dtype == jnp.int32
  assert int(t.min()) >= 0 and int(t.max()) <= 999 and int(t.max()) > 990 and int(t.min()) < 10
  assert int(S.sample_timesteps(jax.random.PRNGKey(0), 64, 10).max()) <= 9


# --- (e) jit + scan ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,eta", [("ddim", 0.0), ("ddim", 0.5), ("euler", 0.0), ("dpmpp_2m", 0.0),
                                      ("lcm", 0.0)])
def test_loop_in_jit_scan(name, eta):
  sampler = S.make_sampler(name, OFFICIAL, 25, eta=eta)
  x = _latents()
  key = jax.random.PRNGKey(7) if eta else None
  run = jax.jit(lambda n, k: S.sample(sampler, _fake_jax, n, key=k))
  got = run(jnp.asarray(x), key)
  assert _rel(got, _our_loop(sampler, x, key=key)) < 1e-6
  if not eta:
    ref, _ = _diffusers_loop(_reference(name, OFFICIAL), 25, x)
    assert _rel(got, ref) < 1e-5
  # state is a valid scan carry: same structure in and out
  state = sampler.init_state(x.shape, key=key)
  _, new_state = sampler.step(state, jnp.asarray(x), 0, jnp.asarray(x))
  assert jax.tree.structure(state) == jax.tree.structure(new_state)


def test_bf16_latents_keep_dtype():
  sampler = S.make_sampler("dpmpp_2m", OFFICIAL, 5)
  out = jax.jit(lambda n: S.sample(sampler, _fake_jax, n))(jnp.asarray(_latents(), jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


# --- (f) errors -------------------------------------------------------------------------------

def test_errors():
  with pytest.raises(ValueError, match="unknown sampler"):
    S.make_sampler("pndm", OFFICIAL, 25)
  for n in (0, -1, 1001):
    with pytest.raises(ValueError, match="num_steps"):
      S.make_sampler("ddim", OFFICIAL, n)
  with pytest.raises(ValueError, match="num_steps"):
    S.ddim_timesteps(OFFICIAL, 2.5)
  with pytest.raises(ValueError, match="outside"):  # leading + offset 1 with 1000 steps -> t = 1000
    S.make_sampler("ddim", OFFICIAL, 1000)
  S.make_sampler("ddim", S.NoiseSchedule(steps_offset=0), 1000)
  with pytest.raises(ValueError, match="sqrt_linear.*diffusers 'linear'"):
    S.NoiseSchedule(beta_schedule="sqrt_linear")
  with pytest.raises(ValueError, match="prediction_type"):
    S.NoiseSchedule(prediction_type="flow")
  with pytest.raises(ValueError, match="timestep_spacing"):
    S.NoiseSchedule(timestep_spacing="karras")
  with pytest.raises(ValueError, match="eta"):
    S.make_sampler("euler", OFFICIAL, 25, eta=0.5)
  with pytest.raises(ValueError, match="key"):
    S.make_sampler("ddim", OFFICIAL, 25, eta=0.5).init_state((1, 4))
  tab = S.ddim_tables(OFFICIAL, 4)
  with pytest.raises(ValueError, match="key"):
    S.ddim_step(OFFICIAL, jnp.zeros(3), 0, jnp.zeros(3), tab, eta=1.0)
