"""Whole-pipeline parity against diffusers AnimateDiffPipeline (tiny, random weights, same latents)."""
import numpy as np
import pytest
import torch

from adiff_jax.sampling import Pipeline, SamplingConfig
from adiff_jax.schedulers import ddim_tables, NoiseSchedule
from torch_ref import tiny_animatediff


def test_ddim_official_timesteps_and_alphas_by_hand():
  """Official config: 25 steps, 'leading' spacing, steps_offset 1, linear betas, set_alpha_to_one."""
  tab = ddim_tables(NoiseSchedule.animatediff(), 25)
  np.testing.assert_array_equal(tab["timesteps"], np.arange(24, -1, -1) * 40 + 1)
  betas = np.linspace(0.00085, 0.012, 1000, dtype=np.float64)
  acp = np.cumprod(1.0 - betas)
  np.testing.assert_allclose(tab["alpha_t"], acp[np.arange(24, -1, -1) * 40 + 1], rtol=1e-5)
  prev = np.arange(24, -1, -1) * 40 + 1 - 40
  want_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], 1.0)
  np.testing.assert_allclose(tab["alpha_prev"], want_prev, rtol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return tiny_animatediff(tmp_path_factory.mktemp("tok"))


def test_pipeline_matches_diffusers_animatediff(reference):
  cfg, params, pipe = reference
  sc = SamplingConfig(frames=8, height=32, width=32, steps=6, guidance_scale=7.5)
  ours = Pipeline(cfg, params)
  prompts, negative = ["a red circle moving left", "a blue square"], ["blurry", ""]
  noise = np.array(ours.initial_noise([1, 2], sc))                      # (B, F, h, w, C)
  got = ours(prompts, negative, seeds=[1, 2], cfg=sc, noise=noise, progress=False)
  with torch.no_grad():
    out = pipe(prompt=prompts, negative_prompt=negative, num_frames=8, height=32, width=32,
               num_inference_steps=6, guidance_scale=7.5, output_type="pt",
               latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3)).frames   # (B, F, C, H, W)
  want = out.permute(0, 1, 3, 4, 2).numpy()
  err = np.abs(got - want).max()
  print(f"pipeline: max abs err on [0, 1] frames = {err:.2e}")
  assert got.shape == want.shape == (2, 8, 32, 32, 3)
  assert want.std() > 0.01  # a non-trivial video
  assert err < 1e-4


def test_pipeline_bad_input(reference):
  cfg, params, _ = reference
  p = Pipeline(cfg, params)
  with pytest.raises(ValueError, match="positional encoding"):
    p(["x"], cfg=SamplingConfig(frames=40, height=32, width=32, steps=2))
  with pytest.raises(ValueError, match="multiples of 8"):
    p(["x"], cfg=SamplingConfig(frames=4, height=36, width=32, steps=2))
  with pytest.raises(ValueError, match="scheduler"):
    p(["x"], cfg=SamplingConfig(frames=4, height=32, width=32, steps=2, scheduler="plms"))
  with pytest.raises(ValueError, match="one seed per prompt"):
    p(["x", "y"], seeds=[1], cfg=SamplingConfig(frames=4, height=32, width=32, steps=2))


def test_pipeline_nan_is_reported(reference):
  cfg, params, _ = reference
  bad = dict(params)
  bad["unet"] = dict(params["unet"])
  bad["unet"]["conv_out"] = {"kernel": params["unet"]["conv_out"]["kernel"] * np.nan,
                             "bias": params["unet"]["conv_out"]["bias"]}
  with pytest.raises(FloatingPointError, match="NaN"):
    Pipeline(cfg, bad)(["x"], cfg=SamplingConfig(frames=4, height=32, width=32, steps=2),
                       progress=False)


SHARDED_SCRIPT = """
import os
# Unoptimised LLVM code: compiles in about half the time, and both sides of each comparison share it.
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from adiff_jax.model import random_params
from adiff_jax.model import ModelConfig
from adiff_jax.sampling import Pipeline, SamplingConfig
from adiff_jax.sharding import make_mesh
cfg = ModelConfig.tiny()
params = random_params(cfg, seed=0)
# give the zero-initialised motion modules weights so frames interact
params["unet"] = jax.tree_util.tree_map_with_path(
    lambda p, v: v + 0.05 if "proj_out" in str(p) and "motion_modules" in str(p) else v, params["unet"])
sc = SamplingConfig(frames=8, height=32, width=32, steps=3)
args = (["a red circle moving left", "a blue square"], ["", "blurry"], [1, 2], sc)
one = Pipeline(cfg, params)(*args, progress=False)
mesh = make_mesh(frames=4)   # data=2 x frames=4
eight = Pipeline(cfg, params, mesh=mesh)(*args, progress=False)
err = float(np.abs(one - eight).max())
print("sharded pipeline max abs err", err)
assert err < 1e-5, err
# SDXL (in this process to save a JAX start-up): its motion-module GroupNorm pools over frames,
# which the frames axis splits over 4 devices; added conditions (pooled text, time ids) ride along.
xl = ModelConfig.tiny_sdxl()
params = random_params(xl, seed=3)
params["unet"] = jax.tree_util.tree_map_with_path(
    lambda p, v: v + 0.05 if "proj_out" in str(p) and "motion_modules" in str(p) else v, params["unet"])
assert xl.motion.norm_across_frames
sc = SamplingConfig(frames=8, height=32, width=32, steps=2, scheduler="euler")
args = (["a red circle moving left"], None, [5], sc)    # no negative prompt: SDXL's zeros
one = Pipeline(xl, params)(*args, progress=False)
eight = Pipeline(xl, params, mesh=mesh)(*args, progress=False)
err = float(np.abs(one - eight).max())
print("sharded SDXL pipeline max abs err", err)
assert err < 1e-5 and one.std() > 0.01, (err, one.std())
"""


def test_sharded_pipeline_8_devices_equals_single_device():
  """SD1.5 and SDXL tiny pipelines on 8 simulated CPU devices (data=2 x frames=4) = one device."""
  import os, subprocess, sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stdout + r.stderr
  print(r.stdout)


def test_progress_loop_equals_the_scan():
  """With a progress bar the loop is one compiled step driven from the host (no host callback in
  compiled code, so it can be cached); it must give the scan's result."""
  from adiff_jax.model import ModelConfig, random_params
  from adiff_jax.sampling import Pipeline, SamplingConfig
  import jax
  cfg = ModelConfig.tiny()
  params = random_params(cfg, seed=1)
  params["unet"] = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.05 if "proj_out" in str(p) and "motion_modules" in str(p) else v, params["unet"])
  pipe = Pipeline(cfg, params)
  for scheduler in ("dpmpp_2m",):   # a multistep sampler: its state goes through the host loop too
    sc = SamplingConfig(frames=4, height=32, width=32, steps=3, scheduler=scheduler)
    a = pipe(["a red circle"], [""], [3], sc, progress=False)
    b = pipe(["a red circle"], [""], [3], sc, progress=True)
    np.testing.assert_allclose(a, b, atol=2e-5)
