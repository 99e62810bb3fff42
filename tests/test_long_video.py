"""Long videos through the whole pipeline: context windows against an independent PyTorch window
loop, prompt travel and FreeNoise against diffusers (dict prompts, enable_free_noise), FreeInit
against diffusers (enable_free_init), windows spread over 8 simulated devices, input errors.
Tiny random weights (tests/torch_ref.tiny_animatediff)."""
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

from adiff_jax import prompt_travel
from adiff_jax.context import ContextConfig, windows
from adiff_jax.errors import InputError
from adiff_jax.free_init import FreeInitConfig
from adiff_jax.free_noise import FreeNoiseConfig
from adiff_jax.sampling import Pipeline, SamplingConfig
from torch_ref import tiny_animatediff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return tiny_animatediff(tmp_path_factory.mktemp("tok"))


def _to_torch(x):   # (B, F, h, w, C) -> (B, C, F, h, w)
  return torch.from_numpy(np.asarray(x)).permute(0, 4, 1, 2, 3).contiguous()


def _frames(out):   # diffusers pt frames (B, F, C, H, W) -> (B, F, H, W, C)
  return out.frames.permute(0, 1, 3, 4, 2).numpy()


# ---- context windows --------------------------------------------------------------------------

@pytest.mark.parametrize("ctx", [ContextConfig(context_length=8, overlap=2),
                                 ContextConfig(context_length=8, overlap=3, schedule="looped",
                                               closed_loop=True, fuse="flat")])
def test_context_windows_match_a_pytorch_window_loop(reference, ctx):
  """Our denoising loop with windows vs diffusers' UNet run per window in a loop written here:
  CFG per window, fused per frame with weights min(p+1, L-p) (pyramid) or 1 (flat), DDIM step."""
  cfg, params, pipe = reference
  n, steps, g = 20, 3, 7.5
  sc = SamplingConfig(frames=n, height=32, width=32, steps=steps, guidance_scale=g, context=ctx)
  ours = Pipeline(cfg, params)
  noise = np.asarray(ours.initial_noise([5], sc))
  cond = ours.encode_prompts(["a red circle"])
  uncond = ours.encode_prompts(["blurry"])
  got = np.asarray(ours.denoise(noise, cond, uncond, sc, progress=False))

  with torch.no_grad():
    pos, neg = pipe.encode_prompt("a red circle", "cpu", 1, True, negative_prompt="blurry")
    text = torch.cat([neg, pos])                                       # (2, 77, D)
    pipe.scheduler.set_timesteps(steps)
    lat = _to_torch(noise)
    length = ctx.context_length
    w = torch.tensor([min(p + 1, length - p) if ctx.fuse == "pyramid" else 1.0 for p in range(length)])
    for i, t in enumerate(pipe.scheduler.timesteps):
      num, den = torch.zeros_like(lat), torch.zeros(n)
      for win in windows(n, i, ctx):    # the schedule itself: tests/test_context.py (hand tables)
        x = lat[:, :, win]
        out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=text.repeat_interleave(length, 0)).sample
        e_u, e_c = out.chunk(2)
        num[:, :, win] += (e_u + g * (e_c - e_u)) * w.view(1, 1, -1, 1, 1)
        den[win] += w
      lat = pipe.scheduler.step(num / den.view(1, 1, -1, 1, 1), t, lat).prev_sample
  want = lat.permute(0, 2, 3, 4, 1).numpy()
  err = np.abs(got - want).max()
  print(f"context windows {ctx.schedule}: max abs err on latents {err:.2e}")
  assert np.abs(want - noise).max() > 0.1       # the loop really denoised
  assert err < 1e-4 * max(1.0, np.abs(want).max())


def test_short_video_with_windows_is_todays_result(reference):
  cfg, params, _ = reference
  ours = Pipeline(cfg, params)
  base = SamplingConfig(frames=8, height=32, width=32, steps=2)
  a = ours(["a red circle"], [""], [3], base, progress=False)
  b = ours(["a red circle"], [""], [3], SamplingConfig(frames=8, height=32, width=32, steps=2,
                                                       context=ContextConfig(context_length=8)),
           progress=False)
  np.testing.assert_array_equal(a, b)


# ---- prompt travel + FreeNoise vs diffusers ----------------------------------------------------

@pytest.mark.parametrize("window", [16, 8])
def test_prompt_travel_and_free_noise_match_diffusers(reference, window):
  """diffusers interpolates dict prompts only with FreeNoise on: window 16 = all frames (the plain
  model), window 8 stride 4 = FreeNoise's motion-module windows (no tail window, where diffusers
  deviates: tests/test_free_noise.py). Same latents on both sides (no noise rescheduling)."""
  cfg, params, pipe = reference
  prompt = {0: "a red circle", 6: "a blue square", 12: "a green triangle"}
  negative = {0: "blurry", 9: "dark"}
  sc = SamplingConfig(frames=16, height=32, width=32, steps=3, guidance_scale=7.5,
                      free_noise=FreeNoiseConfig(context_length=window, context_stride=4))
  ours = Pipeline(cfg, params)
  noise = np.asarray(ours.initial_noise([4], sc))
  got = ours([prompt], [negative], [4], sc, noise=noise, progress=False)
  pipe.enable_free_noise(context_length=window, context_stride=4)
  try:
    with torch.no_grad():
      want = _frames(pipe(prompt=prompt, negative_prompt=negative, num_frames=16, height=32, width=32,
                          num_inference_steps=3, guidance_scale=7.5, output_type="pt",
                          latents=_to_torch(noise)))
  finally:   # diffusers' disable_free_noise assumes a motion module in the mid block: by hand
    pipe._free_noise_context_length = None
    for block in [*pipe.unet.down_blocks, *pipe.unet.up_blocks]:
      pipe._disable_free_noise_in_block(block)
  err = np.abs(got - want).max()
  print(f"prompt travel + FreeNoise(L={window}): max abs err on frames {err:.2e}")
  assert want.std() > 0.01 and err < 1e-4
  # The travelling prompt matters: a fixed prompt gives another video.
  fixed = ours(["a red circle"], ["blurry"], [4], sc, noise=noise, progress=False)
  assert np.abs(fixed - got).max() > 1e-3


def test_lerp_plan_and_slerp_by_hand():
  p = prompt_travel.parse("best quality\n0: a cat\n4: a dog | 6: a fox\nsharp")
  assert p == {0: "best quality, a cat, sharp", 4: "best quality, a dog, sharp",
               6: "best quality, a fox, sharp"}
  lo, hi, alpha = prompt_travel.frame_plan(p, 9)
  np.testing.assert_array_equal(lo, [0, 0, 0, 0, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(hi, [1, 1, 1, 1, 2, 2, 2, 2, 2])
  np.testing.assert_allclose(alpha, [0, .25, .5, .75, 0, .5, 0, 0, 0])
  rng = np.random.RandomState(0)
  e = rng.randn(3, 5, 4).astype(np.float32)
  out = np.asarray(prompt_travel.per_frame(e, p, 9, "slerp"))
  # sd-webui's slerp of whole embeddings, by hand.
  a, b = e[0].ravel().astype(np.float64), e[1].ravel().astype(np.float64)
  theta = np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
  want = (np.sin(0.75 * theta) * a + np.sin(0.25 * theta) * b) / np.sin(theta)
  np.testing.assert_allclose(out[1].ravel(), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[8], e[2], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(prompt_travel.per_frame(e, p, 9))[5], (e[1] + e[2]) / 2, rtol=1e-6)
  # Nearly parallel embeddings: lerp.
  near = np.stack([e[0], e[0] * 1.0001, e[2]])
  np.testing.assert_allclose(np.asarray(prompt_travel.per_frame(near, p, 9, "slerp"))[2],
                             (near[0] + near[1]) / 2, rtol=1e-5)


@pytest.mark.parametrize("text,msg", [("3: a\n1: b", "must increase"), ("2: a\n4: b", "start at frame 0"),
                                      ("0: a\n40: b", "out of range")])
def test_prompt_keyframe_errors(text, msg):
  with pytest.raises(InputError, match=msg):
    prompt_travel.check(prompt_travel.parse(text), 16)


# ---- FreeInit vs diffusers ---------------------------------------------------------------------

@pytest.mark.parametrize("fi", [FreeInitConfig(iterations=2),
                                FreeInitConfig(iterations=3, method="gaussian", fast_sampling=True,
                                               spatial_stop_frequency=0.4, temporal_stop_frequency=0.3)])
def test_free_init_matches_diffusers(reference, fi):
  """Same initial latents, and diffusers' fresh noise per iteration replaced by ours."""
  cfg, params, pipe = reference
  sc = SamplingConfig(frames=8, height=32, width=32, steps=4, guidance_scale=7.5, free_init=fi)
  ours = Pipeline(cfg, params)
  noise = np.asarray(ours.initial_noise([6], sc))
  got = ours(["a red circle"], ["blurry"], [6], sc, noise=noise, progress=False)
  fresh = iter([_to_torch(ours.initial_noise([6], sc, stream=i)) for i in range(1, fi.iterations)])
  pipe.enable_free_init(num_iters=fi.iterations, use_fast_sampling=fi.fast_sampling, method=fi.method,
                        order=fi.order, spatial_stop_frequency=fi.spatial_stop_frequency,
                        temporal_stop_frequency=fi.temporal_stop_frequency)
  try:
    with mock.patch("diffusers.pipelines.free_init_utils.randn_tensor", lambda *a, **k: next(fresh)), \
        torch.no_grad():
      want = _frames(pipe(prompt="a red circle", negative_prompt="blurry", num_frames=8, height=32,
                          width=32, num_inference_steps=4, guidance_scale=7.5, output_type="pt",
                          latents=_to_torch(noise)))
  finally:
    pipe.disable_free_init()
  err = np.abs(got - want).max()
  print(f"FreeInit {fi.method}: max abs err on frames {err:.2e}")
  plain = ours(["a red circle"], ["blurry"], [6], SamplingConfig(frames=8, height=32, width=32, steps=4),
               noise=noise, progress=False)
  assert np.abs(plain - got).max() > 1e-3      # FreeInit changed the result
  assert err < 1e-4


# ---- devices ------------------------------------------------------------------------------------

SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"  # unoptimised LLVM: half the compile time, both sides
import numpy as np, jax
from adiff_jax.context import ContextConfig
from adiff_jax.model import ModelConfig, random_params
from adiff_jax.sampling import Pipeline, SamplingConfig
from adiff_jax.sharding import make_mesh
cfg = ModelConfig.tiny()
params = random_params(cfg, seed=2)
sc = SamplingConfig(frames=40, height=32, width=32, steps=2, context=ContextConfig(context_length=8, overlap=2))
one = Pipeline(cfg, params)
eight = Pipeline(cfg, params, mesh=make_mesh())          # data=8: 8 windows per UNet call
assert eight.context_batch(sc) == 8
args = (["a red circle"], ["blurry"], [7], sc)
a = one(*args, progress=False)
b = eight(*args, progress=False)
err = float(np.abs(a - b).max())
print("8-device windows max abs err", err)
assert err < 1e-5, err
"""


def test_windows_on_8_devices_equal_one_device():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout + r.stderr
  print(r.stdout)


# ---- errors -------------------------------------------------------------------------------------

def test_long_video_errors(reference):
  cfg, params, _ = reference
  p = Pipeline(cfg, params)
  with pytest.raises(InputError, match="--context-length"):
    p.check(SamplingConfig(frames=40, height=32, width=32))
  p.check(SamplingConfig(frames=40, height=32, width=32, context=ContextConfig()))   # fine
  with pytest.raises(InputError, match="positional encoding"):
    p.check(SamplingConfig(frames=80, height=32, width=32, context=ContextConfig(context_length=48)))
  with pytest.raises(InputError, match="overlap"):
    ContextConfig(context_length=16, overlap=16)
  with pytest.raises(InputError, match="out of range"):
    p([{0: "a", 20: "b"}], cfg=SamplingConfig(frames=16, height=32, width=32, steps=1))
  with pytest.raises(InputError, match="iterations"):
    FreeInitConfig(iterations=0)


def test_cli_long_video_options():
  sys.path.insert(0, ROOT)
  import sample
  args = sample.parse_args(["--frames", "64", "--context-length", "16", "--context-overlap", "3",
                            "--context-schedule", "looped", "--closed-loop", "--fuse", "flat",
                            "--free-init", "2", "--free-init-method", "gaussian", "--free-init-ds", "0.3",
                            "--free-noise", "--prompt-interpolation", "slerp"])
  opts = sample.long_video_options(args)
  assert opts["context"] == ContextConfig(context_length=16, overlap=3, schedule="looped",
                                          closed_loop=True, fuse="flat")
  assert opts["free_init"] == FreeInitConfig(iterations=2, method="gaussian", spatial_stop_frequency=0.3)
  assert opts["free_noise"] == FreeNoiseConfig() and opts["prompt_interpolation"] == "slerp"
  for bad, msg in [(["--context-length", "16", "--context-overlap", "16"], "overlap"),
                   (["--closed-loop"], "need --context-length"),
                   (["--free-init", "-1"], "iterations"),
                   (["--free-init", "2", "--free-init-ds", "2"], "spatial_stop_frequency")]:
    with pytest.raises(InputError, match=msg):
      sample.long_video_options(sample.parse_args(bad))
