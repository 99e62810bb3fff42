"""Few-step sampling: the LCM sampler (AnimateLCM) and Euler "trailing" (AnimateDiff-Lightning)
against diffusers, step by step and through the whole pipeline; the AnimateLCM / Lightning files
through the converters."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adiff_jax import schedulers as S
from adiff_jax.errors import InputError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_lcm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(1e-12, np.abs(b).max()))


def _lcm_reference(schedule: S.NoiseSchedule):
  return diffusers.LCMScheduler(
      num_train_timesteps=schedule.num_train_timesteps, beta_start=schedule.beta_start,
      beta_end=schedule.beta_end, beta_schedule=schedule.beta_schedule,
      original_inference_steps=schedule.original_inference_steps, clip_sample=schedule.clip_sample,
      steps_offset=schedule.steps_offset, prediction_type=schedule.prediction_type,
      timestep_scaling=schedule.timestep_scaling, set_alpha_to_one=schedule.set_alpha_to_one)


class _InjectedNoise:
  """Stands in for diffusers' `randn_tensor` in scheduling_lcm: hands out the given noises in
  order (our layout (B, F, h, w, C) -> torch (B, C, F, h, w) with `to_torch`) and counts calls."""

  def __init__(self, noises, to_torch=lambda a: a):
    self.noises, self.to_torch, self.calls = noises, to_torch, 0

  def __call__(self, shape, generator=None, device=None, dtype=None, **kw):
    out = torch.from_numpy(np.array(self.to_torch(np.asarray(self.noises[self.calls]))))
    self.calls += 1
    assert tuple(out.shape) == tuple(shape), (out.shape, shape)
    return out.to(dtype=dtype)


# --- (a) the LCM sampler against diffusers' LCMScheduler -----------------------------------------

def test_lcm_timesteps_by_hand():
  assert S.lcm_timesteps(S.NoiseSchedule.animatelcm(), 4).tolist() == [999, 749, 499, 249]
  assert S.lcm_timesteps(S.NoiseSchedule(), 4).tolist() == [999, 759, 499, 259]   # diffusers default 50
  assert S.lcm_timesteps(S.NoiseSchedule.animatelcm(), 1).tolist() == [999]
  tab = S.lcm_tables(S.NoiseSchedule.animatelcm(), 4)
  acp = S.alphas_cumprod(S.NoiseSchedule.animatelcm())
  s = np.array([999, 749, 499, 249]) * 10.0
  np.testing.assert_allclose(tab["c_skip"], 0.25 / (s ** 2 + 0.25), rtol=1e-6)
  np.testing.assert_allclose(tab["c_out"], s / np.sqrt(s ** 2 + 0.25), rtol=1e-6)
  np.testing.assert_allclose(tab["a_next"], np.sqrt(np.append(acp[[749, 499, 249]], 1.0)), rtol=1e-6)
  np.testing.assert_allclose(tab["s_next"], np.sqrt(1 - np.append(acp[[749, 499, 249]], 1.0)), atol=1e-7)


@pytest.mark.parametrize("original", [50, 100, 25, 1000])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 6, 8, 25])
def test_lcm_timesteps_match_diffusers(original, num_steps):
  sched = dataclasses.replace(S.NoiseSchedule.animatediff(), original_inference_steps=original)
  ref = _lcm_reference(sched)
  ref.set_timesteps(num_steps)
  assert S.lcm_timesteps(sched, num_steps).tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("prediction_type,clip", [("epsilon", False), ("v_prediction", False),
                                                  ("sample", False), ("epsilon", True)])
@pytest.mark.parametrize("original,num_steps", [(100, 4), (50, 6), (50, 1)])
def test_lcm_steps_match_diffusers(monkeypatch, prediction_type, clip, original, num_steps):
  """Random latents and model outputs, the same injected noise (ours, drawn from the key, handed
  to diffusers): every step's result within 1e-5 relative, chained through the loop."""
  sched = S.NoiseSchedule(original_inference_steps=original, prediction_type=prediction_type,
                          clip_sample=clip)
  sampler = S.make_sampler("lcm", sched, num_steps)
  assert sampler.init_noise_sigma == 1.0 and sampler.stochastic
  ref = _lcm_reference(sched)
  ref.set_timesteps(num_steps)
  shape = (2, 4, 3, 8, 8)
  key = jax.random.key(7)
  noises = [S.lcm_noise(key, i, shape) for i in range(num_steps)]
  fake = _InjectedNoise(noises)
  monkeypatch.setattr(scheduling_lcm, "randn_tensor", fake)
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32)
  xt, xj = torch.from_numpy(x), jnp.asarray(x)
  state = sampler.init_state(shape, key=key)
  for i, t in enumerate(ref.timesteps):
    assert int(sampler.timestep(i)) == int(t)
    np.testing.assert_array_equal(np.asarray(sampler.scale_model_input(state, xj, i)), np.asarray(xj))
    out = rng.standard_normal(shape).astype(np.float32)
    xt = ref.step(torch.from_numpy(out), t, xt).prev_sample
    xj, state = sampler.step(state, jnp.asarray(out), i, xj)
    assert _rel(xj, xt.numpy()) < 1e-5, (i, _rel(xj, xt.numpy()))
  assert fake.calls == num_steps - 1   # no noise after the last step
  if num_steps > 1:   # the injected noise matters: another key, another first step
    step0 = lambda k: np.asarray(sampler.step(sampler.init_state(shape, key=k), jnp.asarray(out), 0, xj)[0])
    assert np.abs(step0(key) - step0(jax.random.key(8))).max() > 1e-2


def _fake_model(x, t):
  return 0.1 * x + 0.1 * jnp.sin(x + 0.01 * t.astype(jnp.float32))


def test_lcm_in_jit_scan_and_keys():
  sampler = S.make_sampler("lcm", S.NoiseSchedule.animatelcm(), 4)
  noise = jax.random.normal(jax.random.key(0), (1, 4, 8, 8, 4))
  run = jax.jit(lambda n, k: S.sample(sampler, _fake_model, n, key=k))
  a = np.asarray(run(noise, jax.random.key(1)))
  # a python loop of the same steps
  x, state = noise, sampler.init_state(noise.shape, key=jax.random.key(1))
  for i in range(4):
    x, state = sampler.step(state, _fake_model(x, sampler.timestep(i)), i, x)
  np.testing.assert_allclose(a, np.asarray(x), rtol=1e-5, atol=1e-5)
  assert np.abs(a - np.asarray(run(noise, jax.random.key(2)))).max() > 1e-2   # the key matters
  # without a key: the documented default, jax.random.key(LCM_DEFAULT_SEED)
  default = sampler.init_state(noise.shape)["key"]
  assert (jax.random.key_data(default) == jax.random.key_data(jax.random.key(S.LCM_DEFAULT_SEED))).all()
  # bf16 latents keep their dtype
  xb = noise.astype(jnp.bfloat16)
  assert sampler.step(state, _fake_model(xb, sampler.timestep(0)), 0, xb)[0].dtype == jnp.bfloat16


def test_lcm_errors():
  with pytest.raises(InputError, match="exceed original_inference_steps 50"):
    S.make_sampler("lcm", S.NoiseSchedule(), 51)
  with pytest.raises(InputError, match="original_inference_steps"):
    S.NoiseSchedule(original_inference_steps=0)
  with pytest.raises(InputError, match="original_inference_steps"):
    S.NoiseSchedule(original_inference_steps=1001)
  with pytest.raises(InputError, match="original_inference_steps"):
    S.NoiseSchedule(original_inference_steps=50.0)
  with pytest.raises(InputError, match="timestep_scaling"):
    S.NoiseSchedule(timestep_scaling=0.0)
  with pytest.raises(InputError, match="timestep_scaling"):
    S.NoiseSchedule(timestep_scaling=float("nan"))
  with pytest.raises(InputError, match="eta is only supported by ddim"):
    S.make_sampler("lcm", S.NoiseSchedule(), 4, eta=0.5)
  assert "lcm" in S.SAMPLERS


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_euler_trailing_is_lightning(num_steps):
  """AnimateDiff-Lightning: EulerDiscreteScheduler(timestep_spacing="trailing", linear betas)."""
  sched = S.NoiseSchedule.lightning()
  sampler = S.make_sampler("euler", sched, num_steps)
  ref = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                         steps_offset=1, timestep_spacing="trailing")
  ref.set_timesteps(num_steps)
  np.testing.assert_array_equal(sampler.timesteps, ref.timesteps.numpy())
  np.testing.assert_allclose(sampler.tables["sigmas"], ref.sigmas.numpy(), rtol=1e-6)
  assert abs(sampler.init_noise_sigma - float(ref.init_noise_sigma)) < 1e-4 * float(ref.init_noise_sigma)
  if num_steps == 4:
    assert sampler.timesteps.tolist() == [999, 749, 499, 249]
  x0 = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
  xt = torch.from_numpy(x0) * ref.init_noise_sigma
  for t in ref.timesteps:
    xin = ref.scale_model_input(xt, t)
    xt = ref.step(torch.from_numpy(np.array(_fake_model(jnp.asarray(xin.numpy()), jnp.float32(t)))),
                  t, xt).prev_sample
  got = S.sample(sampler, _fake_model, jnp.asarray(x0))
  assert _rel(got, xt.numpy()) < 1e-5


# --- (b) whole pipeline against diffusers AnimateDiffPipeline -------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Tiny random models on both sides (tests/torch_ref.tiny_animatediff), our Pipeline built
  once so only the denoising loop compiles per sampler; diffusers' parts without a scheduler."""
  from adiff_jax.sampling import Pipeline
  from torch_ref import tiny_animatediff
  cfg, params, pipe = tiny_animatediff(tmp_path_factory.mktemp("tok"))
  parts = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
               motion_adapter=pipe.motion_adapter)
  return Pipeline(cfg, params), parts


FRAMES, SIZE = 4, 32
PROMPTS, NEGATIVE = ["a red circle moving left"], ["blurry"]


def _run_both(reference, sc, diffusers_scheduler):
  from diffusers import AnimateDiffPipeline
  ours, parts = reference
  noise = np.array(ours.initial_noise([1], sc))                      # (B, F, h, w, C)
  got = ours(PROMPTS, NEGATIVE, seeds=[1], cfg=sc, noise=noise, progress=False)
  pipe = AnimateDiffPipeline(**parts, scheduler=diffusers_scheduler)
  with torch.no_grad():
    out = pipe(prompt=PROMPTS, negative_prompt=NEGATIVE, num_frames=FRAMES, height=SIZE, width=SIZE,
               num_inference_steps=sc.steps, guidance_scale=sc.guidance_scale, output_type="pt",
               latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3)).frames   # (B, F, C, H, W)
  want = out.permute(0, 1, 3, 4, 2).numpy()
  assert got.shape == want.shape == (1, FRAMES, SIZE, SIZE, 3)
  assert want.std() > 0.01  # a non-trivial video
  return float(np.abs(got - want).max()), got


def test_pipeline_lcm_matches_diffusers(reference, monkeypatch):
  """AnimateLCM settings: 4 LCM steps (original 100), guidance 1.5. The noise injected between
  steps is made the same on both sides: one table, read by our sampler (in place of its key
  draws) and handed out by diffusers' randn_tensor in step order."""
  from adiff_jax.sampling import SamplingConfig
  sc = SamplingConfig(frames=FRAMES, height=SIZE, width=SIZE, steps=4, guidance_scale=1.5,
                      scheduler="lcm", schedule=S.NoiseSchedule.animatelcm())
  shape = (1, FRAMES, SIZE // 4, SIZE // 4, 4)
  table = np.random.default_rng(11).standard_normal((sc.steps,) + shape).astype(np.float32)
  monkeypatch.setattr(S, "lcm_noise", lambda key, i, shape: jnp.asarray(table)[i])
  fake = _InjectedNoise(table, to_torch=lambda a: a.transpose(0, 4, 1, 2, 3))
  monkeypatch.setattr(scheduling_lcm, "randn_tensor", fake)
  ref = diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                               original_inference_steps=100, steps_offset=1)
  err, _ = _run_both(reference, sc, ref)
  print(f"lcm pipeline: max abs err on [0, 1] frames = {err:.2e}")
  assert fake.calls == 3
  assert err < 1e-4


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_pipeline_euler_trailing_matches_diffusers(reference, guidance):
  """AnimateDiff-Lightning settings: Euler, "trailing", 4 steps; guidance 1 (diffusers then runs
  no unconditional half) and 7.5."""
  from adiff_jax.sampling import SamplingConfig
  sc = SamplingConfig(frames=FRAMES, height=SIZE, width=SIZE, steps=4, guidance_scale=guidance,
                      scheduler="euler", schedule=S.NoiseSchedule.lightning())
  ref = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                         steps_offset=1, timestep_spacing="trailing")
  err, _ = _run_both(reference, sc, ref)
  print(f"euler trailing pipeline, guidance {guidance}: max abs err on [0, 1] frames = {err:.2e}")
  assert err < 1e-4


# --- (c) the published files through the converters ----------------------------------------------

def _flat_equal(a, b):
  from adiff_jax.params import flatten
  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_animatelcm_motion_module_without_pe(tmp_path):
  """AnimateLCM_sd15_t2v.ckpt: official key layout, mid-block module, two Temporal_Self, and no
  pe buffers in the file. Loading builds them (length 64, AnimateLCM's code); inspect names it."""
  from convert_weights import io, motion_module_files as motion
  from convert_weights.inspect_cmd import inspect
  from test_convert import official_sd, tiny_adapter
  adapter = tiny_adapter(mid=True, max_len=32, seed=5)
  src = str(tmp_path / "AnimateLCM_sd15_t2v.ckpt")
  io.save_torch_file(official_sd(adapter, with_pe=False), src)
  info = {}
  tree, cfg, version = motion.load_motion_module(src, num_heads=2, norm_groups=8, info=info)
  assert version == "v2" and cfg.mid_block and cfg.max_len == 64 and cfg.num_attention_blocks == 2
  assert info["format"] == "original" and not info["extras"]
  assert any("AnimateLCM" in n and "64" in n for n in info["notes"]), info["notes"]
  # the same weights as an official v2 file with pe: the same parameters
  with_pe = str(tmp_path / "mm_v2.ckpt")
  io.save_torch_file(official_sd(adapter, with_pe=True), with_pe)
  want, want_cfg, _ = motion.load_motion_module(with_pe, num_heads=2, norm_groups=8)
  _flat_equal(tree, want)
  assert want_cfg.max_len == 32
  # the built pe: exported as a MotionAdapter, diffusers loads it and its first 32 positions are
  # the original adapter's buffer
  out = str(tmp_path / "adapter")
  motion.export_motion_module(tree, cfg, out, fmt="diffusers")
  loaded, linfo = diffusers.MotionAdapter.from_pretrained(out, output_loading_info=True)
  assert not linfo["missing_keys"] and not linfo["unexpected_keys"], linfo
  ref = adapter.state_dict()
  for k, v in loaded.state_dict().items():
    if k.endswith("pos_embed.pe"):
      assert v.shape[1] == 64
      assert torch.equal(v[:, :32], ref[k]), k
    else:
      assert torch.equal(v, ref[k]), k
  # renamed, the same file still loads as v2 (pe 32) and the note says what it looks like
  renamed = str(tmp_path / "some_motion_module.ckpt")
  os.link(src, renamed)
  info = {}
  _, cfg2, v2 = motion.load_motion_module(renamed, num_heads=2, norm_groups=8, info=info)
  assert v2 == "v2" and cfg2.max_len == 32 and any("AnimateLCM" in n for n in info["notes"])
  text = inspect(src)
  assert "known file: AnimateLCM motion module" in text and "--scheduler lcm" in text, text
  assert "conversion check: ok" in text and "version v2 (pe length 64" in text, text
  assert "known file" not in inspect(renamed)


def test_animatelcm_code_pos_encoding_buffers(tmp_path):
  """AnimateLCM's own code names the pe buffer `pos_encoder.pos_encoding` (length 64): a file
  saved from it loads too, the buffers kept aside like `pe`."""
  from convert_weights import io, motion_module_files as motion
  from test_convert import official_sd, tiny_adapter
  adapter = tiny_adapter(mid=True, max_len=64, seed=5)
  sd = {k.replace(".pos_encoder.pe", ".pos_encoder.pos_encoding"): v
        for k, v in official_sd(adapter, with_pe=True).items()}
  assert sum(k.endswith("pos_encoding") for k in sd) > 0
  src = str(tmp_path / "animatelcm_from_code.safetensors")
  io.save_torch_file(sd, src)
  info = {}
  _, cfg, version = motion.load_motion_module(src, num_heads=2, norm_groups=8, info=info)
  assert version == "v2" and cfg.max_len == 64 and len(info["extras"]) == sum(k.endswith("pos_encoding") for k in sd)


def _kohya_name(path: str) -> str:
  return "lora_unet_" + path.replace("/", "_")


def test_animatelcm_lora_merge_and_inspect(tmp_path):
  """AnimateLCM_sd15_t2v_lora.safetensors: kohya keys (lora_unet_<diffusers module path>) on
  attention, feed-forward, proj, ResNet convs (3x3) and time projections, with alpha tensors.
  AnimateLCM merges W += (1/8) * scale * up @ down, alpha ignored: our official-scaling merge at
  multiplier scale / 8 is the same."""
  from adiff_jax.model import ModelConfig, random_params
  from adiff_jax.params import flatten
  from convert_weights import io, lora_files
  from convert_weights.inspect_cmd import inspect
  from convert_weights.tree import tree_to_state_dict
  unet = random_params(ModelConfig.tiny(), seed=0)["unet"]
  flat = flatten(unet)
  layers = ["down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q",
            "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_out_0",
            "down_blocks_0/attentions_0/transformer_blocks_0/ff/net_0/proj",
            "down_blocks_0/attentions_0/proj_in", "mid_block/resnets_0/conv1",
            "down_blocks_1/resnets_0/conv_shortcut", "up_blocks_1/resnets_2/time_emb_proj"]
  rng = np.random.default_rng(3)
  r, scale = 4, 0.8
  sd = {}
  for layer in layers:
    w = tree_to_state_dict({"x": {"kernel": flat[layer + "/kernel"]}})["x.weight"]
    down = rng.standard_normal((r, w.shape[1]) + tuple(w.shape[2:])).astype(np.float32)
    up = rng.standard_normal((w.shape[0], r) + ((1, 1) if w.ndim == 4 else ())).astype(np.float32)
    sd[_kohya_name(layer) + ".lora_down.weight"], sd[_kohya_name(layer) + ".lora_up.weight"] = down, up
    sd[_kohya_name(layer) + ".alpha"] = np.array(1.0, np.float32)   # ignored by AnimateLCM
  src = str(tmp_path / "AnimateLCM_sd15_t2v_lora.safetensors")
  io.save_torch_file(sd, src)
  merged, _ = lora_files.merge_kohya_lora(unet, None, src, alpha=scale / 8)
  got = flatten(merged)
  for layer in layers:   # AnimateLCM's convert_lcm_lora, in torch layout
    w = torch.from_numpy(tree_to_state_dict({"x": {"kernel": flat[layer + "/kernel"]}})["x.weight"])
    up = torch.from_numpy(sd[_kohya_name(layer) + ".lora_up.weight"])
    down = torch.from_numpy(sd[_kohya_name(layer) + ".lora_down.weight"])
    want = w + 1 / 8 * scale * torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(w.shape)
    have = tree_to_state_dict({"x": {"kernel": got[layer + "/kernel"]}})["x.weight"]
    np.testing.assert_allclose(have, want.numpy(), rtol=1e-5, atol=1e-5, err_msg=layer)
  text = inspect(src)
  assert "format: kohya_lora" in text and "known file: AnimateLCM spatial LoRA" in text, text
  assert "--lora FILE:0.1" in text and "1/8" in text, text


@pytest.mark.parametrize("layout", ["diffusers", "comfyui"])
def test_lightning_motion_module(tmp_path, layout):
  """animatediff_lightning_4step_diffusers.safetensors: a diffusers MotionAdapter state dict in one
  file (mid block, pe 32); the _comfyui file is the official layout. Both load; inspect names them."""
  from convert_weights import io, motion_module_files as motion
  from convert_weights.inspect_cmd import inspect
  from test_convert import np_sd, official_sd, tiny_adapter
  adapter = tiny_adapter(mid=True, max_len=32, seed=6)
  src = str(tmp_path / f"animatediff_lightning_4step_{layout}.safetensors")
  io.save_torch_file(np_sd(adapter) if layout == "diffusers" else official_sd(adapter), src)
  info = {}
  tree, cfg, version = motion.load_motion_module(src, num_heads=2, norm_groups=8, info=info)
  assert version == "v2" and cfg.max_len == 32 and cfg.mid_block
  assert info["format"] == ("diffusers" if layout == "diffusers" else "original")
  ref = str(tmp_path / "official.safetensors")
  io.save_torch_file(official_sd(adapter), ref)
  _flat_equal(tree, motion.load_motion_module(ref, num_heads=2, norm_groups=8)[0])
  text = inspect(src)
  assert f"format: motion_module_{'diffusers' if layout == 'diffusers' else 'original'}" in text
  assert "known file: AnimateDiff-Lightning 4-step motion module" in text, text
  assert "--scheduler euler --timestep-spacing trailing --steps 4 --guidance-scale 1.0" in text, text


# --- sample.py flags -----------------------------------------------------------------------------

def test_sample_cli_few_step_flags():
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import sample
  a = sample.parse_args(["--scheduler", "lcm", "--steps", "4", "--guidance-scale", "1.5",
                         "--lcm-original-steps", "100"])
  sched = sample.cli_schedule(a)
  assert sched.original_inference_steps == 100
  assert S.make_sampler(a.scheduler, sched, a.steps).timesteps.tolist() == [999, 749, 499, 249]
  sched = sample.cli_schedule(sample.parse_args(["--scheduler", "euler", "--timestep-spacing", "trailing",
                                                 "--steps", "4"]))
  assert sched.timestep_spacing == "trailing" and sched.beta_schedule == "linear"
  assert sample.cli_schedule(sample.parse_args([])) == S.NoiseSchedule.animatediff()
  with pytest.raises(InputError, match="exceed original_inference_steps 50"):
    sample.cli_schedule(sample.parse_args(["--scheduler", "lcm", "--steps", "60"]))
  with pytest.raises(InputError, match="original_inference_steps"):
    sample.cli_schedule(sample.parse_args(["--scheduler", "lcm", "--lcm-original-steps", "0"]))
  for name in S.SAMPLERS:
    assert sample.parse_args(["--scheduler", name]).scheduler == name
