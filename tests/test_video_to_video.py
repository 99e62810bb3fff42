"""Video-to-video: the input video VAE-encoded, noised to the first step that runs (strength),
the remaining steps denoised. Against diffusers: the samplers started mid-schedule
(`scheduler.add_noise` + the sliced timesteps) and `AnimateDiffVideoToVideoPipeline` with random
tiny weights; errors before anything compiles."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adiff_jax import schedulers as S
from adiff_jax.errors import InputError
from adiff_jax.sampling import Pipeline, SamplingConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

KW = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
          steps_offset=1)


def _fake(x, t):   # nonlinear in x and t, so a wrong start or table compounds
  return 0.1 * x + 0.1 * np.sin(x + 0.01 * t)


def _diffusers_sched(name, spacing):
  kw = dict(KW, timestep_spacing=spacing)
  if name == "ddim":
    return diffusers.DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=True)
  if name == "euler":
    return diffusers.EulerDiscreteScheduler(**kw)
  return diffusers.DPMSolverMultistepScheduler(**kw)


@pytest.mark.parametrize("name,spacing", [("ddim", "leading"), ("euler", "leading"),
                                          ("euler", "trailing"), ("dpmpp_2m", "leading")])
@pytest.mark.parametrize("steps,strength", [(10, 0.6), (7, 0.3)])
def test_samplers_started_mid_schedule_match_diffusers(name, spacing, steps, strength):
  """diffusers' img2img recipe (get_timesteps + add_noise at timesteps[start] + the loop over the
  rest) by hand vs noise_to_step + start_at + the steps from `start`."""
  sched = S.NoiseSchedule(timestep_spacing=spacing)
  sc = SamplingConfig(steps=steps, strength=strength, scheduler=name, schedule=sched)
  start = sc.start_step()
  assert start == steps - int(steps * strength)
  rng = np.random.RandomState(0)
  x0, noise = rng.randn(2, 1, 4, 8, 8).astype(np.float32)

  ref = _diffusers_sched(name, spacing)
  ref.set_timesteps(steps)
  ts = ref.timesteps[start:]
  x = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ts[:1])
  for t in ts:
    xin = ref.scale_model_input(x, t)
    x = ref.step(torch.from_numpy(_fake(xin.numpy(), float(t)).astype(np.float32)), t, x).prev_sample
  want = x.numpy()

  sampler = S.make_sampler(name, sched, steps)
  y = S.noise_to_step(sampler, jnp.asarray(x0), jnp.asarray(noise), start)
  run = S.start_at(sampler, start)
  state = run.init_state(y.shape)
  for i in range(start, steps):
    t = run.timestep(i)
    eps = _fake(np.asarray(run.scale_model_input(state, y, i)), float(t)).astype(np.float32)
    y, state = run.step(state, jnp.asarray(eps), i, y)
  err = np.abs(np.asarray(y) - want).max() / np.abs(want).max()
  assert err < 1e-5, (name, spacing, err)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  from torch_ref import tiny_animatediff
  cfg, params, pipe = tiny_animatediff(tmp_path_factory.mktemp("tok"))
  return Pipeline(cfg, params), pipe


F, SIZE = 8, 32


def _video(seed=0):   # a smooth moving pattern in [0, 1], (1, F, H, W, 3)
  y, x = np.mgrid[:SIZE, :SIZE] / SIZE
  v = [np.stack([0.5 + 0.4 * np.sin(6 * x + 0.5 * f + seed), 0.5 + 0.4 * np.cos(5 * y - 0.3 * f),
                 0.5 + 0.3 * np.sin(4 * (x + y))], -1) for f in range(F)]
  return np.asarray(v, np.float32)[None]


# DDIM (official settings) here; every sampler's mid-schedule start is checked above.
@pytest.mark.parametrize("scheduler,strength", [("ddim", 0.6)])
def test_video_to_video_matches_diffusers(reference, scheduler, strength):
  """Same video, same VAE posterior draw and noise on both sides (diffusers' randn replaced by
  ours), official DDIM settings / DPM++ 2M: frames agree < 1e-4."""
  from diffusers import AnimateDiffVideoToVideoPipeline, DDIMScheduler, DPMSolverMultistepScheduler
  ours, pipe = reference
  steps = 5
  sc = SamplingConfig(frames=F, height=SIZE, width=SIZE, steps=steps, strength=strength,
                      scheduler=scheduler)
  video = _video()
  noise = np.array(ours.initial_noise([3], sc))                              # (1, F, h, w, 4)
  got = ours(["a red circle"], ["blurry"], [3], sc, noise=noise, init_video=video, progress=False)

  # Our encoder's posterior draw for the video (Pipeline.encode_frames: key 0, whole clip).
  h = SIZE // ours.config.latent_factor
  eps = np.array(jax.random.normal(jax.random.key(0), (F, h, h, 4), jnp.float32))
  draws = iter([torch.from_numpy(eps).permute(0, 3, 1, 2),              # VAE posterior (F, C, h, w)
                torch.from_numpy(noise).permute(0, 1, 4, 2, 3)])        # add_noise (B, F, C, h, w)
  sched = (DDIMScheduler(**KW, clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
           if scheduler == "ddim" else DPMSolverMultistepScheduler(**KW, timestep_spacing="leading"))
  v2v = AnimateDiffVideoToVideoPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer, unet=pipe.unet,
                                        motion_adapter=pipe.motion_adapter, scheduler=sched)
  fake = lambda *a, **k: next(draws)
  with mock.patch("diffusers.models.autoencoders.vae.randn_tensor", fake), \
      mock.patch("diffusers.pipelines.animatediff.pipeline_animatediff_video2video.randn_tensor", fake), \
      torch.no_grad():
    out = v2v(video=video, prompt="a red circle", negative_prompt="blurry", height=SIZE, width=SIZE,
              num_inference_steps=steps, guidance_scale=7.5, strength=strength, output_type="pt")
  want = out.frames.permute(0, 1, 3, 4, 2).numpy()
  err = np.abs(got - want).max()
  print(f"video-to-video {scheduler} strength {strength}: max abs err on frames {err:.2e}")
  assert got.shape == want.shape == (1, F, SIZE, SIZE, 3)
  t2v = ours(["a red circle"], ["blurry"], [3], sc, noise=noise, progress=False)
  assert np.abs(t2v - got).max() > 1e-2          # the input video changed the result
  assert err < 1e-4


def test_video_to_video_errors(reference):
  ours, _ = reference
  sc = SamplingConfig(frames=F, height=SIZE, width=SIZE, steps=4, strength=0.5)
  with pytest.raises(InputError, match="strength must be in"):
    ours(["a"], seeds=[0], cfg=SamplingConfig(frames=F, height=SIZE, width=SIZE, strength=1.5),
         init_video=_video())
  with pytest.raises(InputError, match="leaves no step"):
    ours(["a"], seeds=[0], cfg=SamplingConfig(frames=F, height=SIZE, width=SIZE, steps=4, strength=0.2),
         init_video=_video())
  with pytest.raises(InputError, match="init_video has 4 frames"):
    ours(["a"], seeds=[0], cfg=sc, init_video=_video()[:, :4])
  with pytest.raises(InputError, match=r"init_video must be \(B, F, 32, 32, 3\)"):
    ours(["a"], seeds=[0], cfg=sc, init_video=np.zeros((1, F, 64, 64, 3), np.float32))
  with pytest.raises(InputError, match="not both"):
    ours(["a"], seeds=[0], cfg=sc, init_video=_video(), init_latents=np.zeros((1, F, 4, 4, 4)))
  with pytest.raises(InputError, match="init_latents must be"):
    ours(["a"], seeds=[0], cfg=sc, init_latents=np.zeros((1, F, 4, 4, 4)))


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_init_video(tmp_path, capsys):
  """--init-video FILE --strength on the built-in model: a GIF longer and larger than the clip is
  cut and resized (with notes); strength 0 and a short video fail before the model loads."""
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import sample
  from adiff_jax.errors import run_cli
  from adiff_jax.video_io import read_video, save_gif, to_uint8
  src = str(tmp_path / "in.gif")
  big = np.repeat(np.repeat(np.concatenate([_video(), _video(1)], 1)[0], 2, 1), 2, 2)   # (16, 64, 64, 3)
  save_gif(to_uint8(big), src)
  fast = ["--frames", "4", "--steps", "4", "--height", "32", "--width", "32", "--seed", "1",
          "--prompt", "a red circle", "--init-video", src]
  assert sample.main(fast + ["--strength", "0.5", "--out", str(tmp_path / "o")]) == 0
  out = capsys.readouterr().out
  assert "has 16 frames: using the first 4" in out and "resized to 32x32" in out, out
  assert "strength 0.5: steps 3..4 of 4 run" in out, out
  (run,) = os.listdir(tmp_path / "o")
  (gif,) = [n for n in os.listdir(tmp_path / "o" / run / "sample") if n.endswith(".gif")]
  assert read_video(str(tmp_path / "o" / run / "sample" / gif)).shape == (4, 32, 32, 3)
  import yaml
  resolved = yaml.safe_load(open(tmp_path / "o" / run / "config.yaml"))
  assert resolved["init_video"] == src and resolved["strength"] == 0.5
  assert run_cli(sample.main, fast + ["--strength", "1.5"]) == 2
  assert run_cli(sample.main, fast[:-1] + [str(tmp_path / "missing.mp4")]) == 2
  assert run_cli(sample.main, ["--frames", "20"] + fast[2:]) == 2      # 16 frames < 20
  err = capsys.readouterr().err
  assert "--strength must be in [0, 1]" in err and "video not found" in err, err
  assert "has 16 frames, the clip needs 20" in err, err
