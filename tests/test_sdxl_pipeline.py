"""SDXL sampling: our Pipeline on a tiny SDXL model vs diffusers' AnimateDiffSDXLPipeline with
the same random weights (two text encoders, pooled text and time ids as added conditions, the
official sdxl-branch Euler settings, no-negative-prompt zeros); SDXL-only errors."""
import numpy as np
import pytest

from adiff_jax.errors import InputError
from adiff_jax.sampling import Pipeline, SamplingConfig
from adiff_jax.schedulers import NoiseSchedule

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

F, SIZE, STEPS = 4, 32, 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  from torch_ref import tiny_animatediff_sdxl
  cfg, params, pipe = tiny_animatediff_sdxl(str(tmp_path_factory.mktemp("tok")))
  return Pipeline(cfg, params), pipe


@pytest.mark.parametrize("negative", ["blurry, low quality", None], ids=["negative", "zeros"])
def test_sdxl_pipeline_matches_diffusers(reference, negative):
  ours, pipe = reference
  sc = SamplingConfig(frames=F, height=SIZE, width=SIZE, steps=STEPS, guidance_scale=8.5,
                      scheduler="euler", schedule=NoiseSchedule.animatediff_sdxl())
  noise = np.array(ours.initial_noise([4], sc))
  got = ours(["a red circle moving left"], None if negative is None else [negative], [4], sc,
             noise=noise, progress=False)
  with torch.no_grad():
    out = pipe(prompt="a red circle moving left", negative_prompt=negative, num_frames=F, height=SIZE,
               width=SIZE, num_inference_steps=STEPS, guidance_scale=8.5, output_type="pt",
               latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3))
  want = out.frames.permute(0, 1, 3, 4, 2).numpy()
  err = np.abs(got - want).max()
  print(f"SDXL pipeline ({'negative prompt' if negative else 'zeros'}): max abs err on frames {err:.2e}")
  assert got.shape == want.shape == (1, F, SIZE, SIZE, 3) and want.std() > 0.01
  assert err < 1e-4


def test_sdxl_errors(reference):
  ours, _ = reference
  sc = SamplingConfig(frames=F, height=SIZE, width=SIZE, steps=2)
  with pytest.raises(InputError, match="travelling prompts are not supported with SDXL"):
    ours([{0: "a", 2: "b"}], seeds=[0], cfg=sc)
  with pytest.raises(InputError, match="need the video size"):
    ours.encode_prompts(["a"])
  enc = ours.encode_prompts(["a", "b"], size=(SIZE, SIZE))
  assert enc["context"].shape == (2, 77, 32) and enc["text_embeds"].shape == (2, 16)
  np.testing.assert_array_equal(np.asarray(enc["time_ids"]), [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2)
  from adiff_jax.model import random_params
  params = random_params(ours.config)
  del params["text_encoder_2"]
  with pytest.raises(InputError, match="text_encoder_2"):
    Pipeline(ours.config, params)


def test_cli_sdxl_folder_and_motion_adapter(reference, tmp_path, capsys):
  """sample.py on a diffusers SDXL folder + an SDXL MotionAdapter folder: recognised before
  loading, the official sdxl defaults (Euler, its betas, guidance 8.5), zeros for the missing
  negative prompt; the SDXL-only refusals."""
  import os
  import sys
  import yaml
  from diffusers import StableDiffusionXLPipeline
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import sample
  from adiff_jax.errors import run_cli
  from torch_ref import randomize_, tiny_unet2d_sdxl
  _, pipe = reference
  base = str(tmp_path / "sdxl")
  StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                            tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2,
                            unet=randomize_(tiny_unet2d_sdxl(), 5), scheduler=pipe.scheduler).save_pretrained(base)
  mm = str(tmp_path / "mm_sdxl")
  pipe.motion_adapter.save_pretrained(mm)
  argv = ["--ckpt", base, "--motion-module", mm, "--frames", "4", "--steps", "2", "--height", "32",
          "--width", "32", "--seed", "3", "--prompt", "a cat", "--cache-dir", str(tmp_path / "cache")]
  assert sample.main(argv + ["--out", str(tmp_path / "o")]) == 0
  out = capsys.readouterr().out
  assert "(SDXL)" in out and "2 euler steps, guidance 8.5" in out, out
  (run,) = os.listdir(tmp_path / "o")
  resolved = yaml.safe_load(open(tmp_path / "o" / run / "config.yaml"))
  assert resolved["noise_scheduler_kwargs"]["beta_end"] == 0.02
  assert resolved["noise_scheduler_kwargs"]["beta_schedule"] == "scaled_linear"
  assert run_cli(sample.main, argv + ["--prompt", "0: a | 2: b"]) == 2
  assert "not supported with SDXL" in capsys.readouterr().err
