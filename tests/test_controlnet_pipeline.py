"""Dense ControlNets in the sampling pipeline: two at once with their own scales and step ranges
against diffusers' `AnimateDiffControlNetPipeline` (MultiControlNetModel), random tiny weights;
guess mode by hand; errors before compiling. (8 devices: tests/test_sparse_ctrl_pipeline.py runs
SparseCtrl and a ControlNet together sharded.)"""
import numpy as np
import pytest

from adiff_jax.control import ControlNetSampling
from adiff_jax.errors import InputError
from adiff_jax.sampling import Pipeline, SamplingConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

F, SIZE, STEPS = 4, 32, 4
EMB = (8, 16, 16)   # two stride-2 steps: control images at the tiny VAE's factor 4
NETS = [ControlNetSampling(0.8, start=0.0, end=0.5), ControlNetSampling(0.5, start=0.25, end=1.0)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  from torch_ref import tiny_animatediff, tiny_controlnet
  from convert_weights.controlnet_files import tree_from_state_dict
  cfg, params, pipe = tiny_animatediff(tmp_path_factory.mktemp("tok"))
  nets = [tiny_controlnet(s, conditioning_embedding_out_channels=EMB) for s in (5, 6)]
  ours = []
  for n in nets:
    tree, cn_cfg, cn_unet = tree_from_state_dict(n.state_dict(), "tiny", diffusers_cfg=dict(n.config),
                                                 unet=cfg.unet)
    ours.append((cn_cfg, cn_unet, tree))
  return cfg, params, pipe, nets, ours


def _frames(seed):   # (1, F, H, W, 3) in [0, 1]
  return np.random.default_rng(seed).uniform(0, 1, (1, F, SIZE, SIZE, 3)).astype(np.float32)


def test_multi_controlnet_with_ranges_matches_diffusers(reference):
  """Each step i of n keeps a ControlNet unless i/n < start or (i+1)/n > end: with 4 steps the
  first acts on steps 0-1, the second on 1-3; residuals summed; CFG batch for both."""
  from diffusers import AnimateDiffControlNetPipeline
  cfg, params, pipe, nets, ours_nets = reference
  sc = SamplingConfig(frames=F, height=SIZE, width=SIZE, steps=STEPS, controlnets=tuple(NETS))
  ours = Pipeline(cfg, params, controlnets=ours_nets)
  noise = np.array(ours.initial_noise([2], sc))
  videos = [_frames(1), _frames(2)]
  got = ours(["a red circle"], ["blurry"], [2], sc, noise=noise, progress=False, controlnet_frames=videos)

  ref = AnimateDiffControlNetPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                      unet=pipe.unet, motion_adapter=pipe.motion_adapter,
                                      controlnet=nets, scheduler=pipe.scheduler)
  with torch.no_grad():
    out = ref(prompt="a red circle", negative_prompt="blurry", num_frames=F, height=SIZE, width=SIZE,
              num_inference_steps=STEPS, guidance_scale=7.5, output_type="pt",
              latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3),
              conditioning_frames=[list(v[0]) for v in videos],
              controlnet_conditioning_scale=[n.conditioning_scale for n in NETS],
              control_guidance_start=[n.start for n in NETS], control_guidance_end=[n.end for n in NETS])
  want = out.frames.permute(0, 1, 3, 4, 2).numpy()
  err = np.abs(got - want).max()
  print(f"multi-ControlNet pipeline: max abs err on frames {err:.2e}")
  plain = ours(["a red circle"], ["blurry"], [2], SamplingConfig(frames=F, height=SIZE, width=SIZE, steps=STEPS),
               noise=noise, progress=False, controlnet_frames=[v * 0 for v in videos])
  assert np.abs(plain - got).max() > 1e-3        # the ControlNets changed the result
  assert err < 1e-4


def test_guess_mode_by_hand(reference):
  """Guess mode: the ControlNet runs on the conditional half only and the unconditional half
  gets no residuals (diffusers' SD ControlNet pipelines; its AnimateDiff one breaks there), so
  with guidance 1 (conditional half only) it equals plain mode with guess-mode weights, and with
  CFG the unconditional prediction is the UNet's own."""
  import jax.numpy as jnp
  from adiff_jax import control
  cfg, params, _, _, ours_nets = reference
  ours = Pipeline(cfg, params, controlnets=ours_nets[:1])
  net, p = ours.controlnets[0], ours.controlnet_params[0]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, F, 8, 8, 4)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32)
  leaves = ((control.pack_frames(jnp.asarray(_frames(3))),),)
  args = ((p, jnp.float32(0.7), jnp.float32(0.0), jnp.float32(1.0)),)
  unit = (control.ControlUnit(net, "controlnet", guess_mode=True),)
  tt = jnp.full((2,), 500.0)
  got = control.residuals(unit, args, leaves, jnp.concatenate([x, x]), text, tt, 0, 4, guided=True)
  want = net.apply({"params": p}, x, tt[:1], text[1:], jnp.asarray(_frames(3)), conditioning_scale=0.7,
                   guess_mode=True)
  for g, w in zip(got["down_residuals"] + [got["mid_residual"]], want[0] + [want[1]]):
    np.testing.assert_array_equal(np.asarray(g[:1]), 0.0)
    np.testing.assert_allclose(np.asarray(g[1:]), np.asarray(w), rtol=1e-5, atol=1e-6)
  # outside its range a ControlNet adds nothing
  off = control.residuals(unit, ((p, jnp.float32(0.7), jnp.float32(0.5), jnp.float32(1.0)),), leaves,
                          jnp.concatenate([x, x]), text, tt, 0, 4, guided=True)
  assert all(float(jnp.abs(r).max()) == 0.0 for r in off["down_residuals"])


def test_errors_before_compiling(reference):
  cfg, params, _, _, ours_nets = reference
  ours = Pipeline(cfg, params, controlnets=ours_nets)
  sc = SamplingConfig(frames=F, height=SIZE, width=SIZE, steps=2)
  with pytest.raises(InputError, match="give one control video each"):
    ours(["a"], seeds=[0], cfg=sc, controlnet_frames=[_frames(1)])
  with pytest.raises(InputError, match="control video has 2 frames"):
    ours(["a"], seeds=[0], cfg=sc, controlnet_frames=[_frames(1), _frames(1)[:, :2]])
  with pytest.raises(InputError, match=r"control frames must be \(B, F, 32, 32, 3\)"):
    ours(["a"], seeds=[0], cfg=sc, controlnet_frames=[_frames(1), np.zeros((1, F, 16, 16, 3))])
  with pytest.raises(InputError, match="has 1 entries for 2"):
    ours.check(SamplingConfig(frames=F, height=SIZE, width=SIZE, controlnets=(NETS[0],)))
  with pytest.raises(InputError, match="0 <= start < end <= 1"):
    ControlNetSampling(start=0.6, end=0.5)
  cn_cfg, cn_unet, tree = ours_nets[0]
  import dataclasses
  with pytest.raises(InputError, match="takes images at 8x the latent size"):
    Pipeline(cfg, params, controlnets=[(dataclasses.replace(cn_cfg, conditioning_embedding_channels=(8, 16, 16, 16)),
                                        cn_unet, tree)])


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_controlnets(tmp_path, capsys):
  """Two ControlNets (a diffusers folder and an LDM file) with scales, ranges and control
  videos on the built-in model; the prompt-config `controlnets` key; errors before compiling."""
  import os
  import sys
  import yaml
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import sample
  from adiff_jax.errors import run_cli
  from adiff_jax.video_io import save_gif, to_uint8
  from convert_weights.controlnet_files import controlnet_state_dict, tree_from_state_dict
  from safetensors.torch import save_file
  from torch_ref import tiny_controlnet
  nets = [tiny_controlnet(s, conditioning_embedding_out_channels=EMB) for s in (7, 8)]
  folder = str(tmp_path / "cn_a")
  nets[0].save_pretrained(folder)
  tree, _, _ = tree_from_state_dict(nets[1].state_dict(), "b", diffusers_cfg=dict(nets[1].config))
  ldm = str(tmp_path / "control_b.safetensors")
  save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in controlnet_state_dict(tree, "ldm").items()}, ldm)
  vid = str(tmp_path / "depth.gif")
  save_gif(to_uint8(_frames(9)[0]), vid)
  argv = ["--frames", "4", "--steps", "2", "--height", "32", "--width", "32", "--seed", "1",
          "--prompt", "a red circle", "--controlnet", f"{folder}:0.7", "--control-video", vid,
          "--controlnet", ldm, "--control-images", str(tmp_path / "frames"), "--control-range", "0:0.5",
          "--control-range", "0.5:1"]
  os.makedirs(tmp_path / "frames")
  from PIL import Image
  for i, f in enumerate(to_uint8(_frames(10)[0])):
    Image.fromarray(f).save(tmp_path / "frames" / f"{i:03d}.png")
  assert sample.main(argv + ["--out", str(tmp_path / "o")]) == 0
  out = capsys.readouterr().out
  assert f"ControlNet {folder}: scale 0.7, steps 0..0.5" in out and f"ControlNet {ldm}: scale 1.0, steps 0.5..1" in out, out
  (run,) = os.listdir(tmp_path / "o")
  resolved = yaml.safe_load(open(tmp_path / "o" / run / "config.yaml"))
  assert [n["path"] for n in resolved["controlnets"]] == [folder, ldm]
  # its controlnets key runs as a prompt config
  entry = {k: resolved[k] for k in ("prompt", "seed", "steps", "W", "H", "L", "controlnets")}
  (tmp_path / "p.yaml").write_text(yaml.safe_dump([entry]))
  assert sample.main(["--config", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "o2")]) == 0
  assert f"ControlNet {ldm}: scale 1.0, steps 0.5..1" in capsys.readouterr().out

  base = argv[:14]                                                   # one --controlnet, no video
  assert run_cli(sample.main, base) == 2                                          # no control video
  assert run_cli(sample.main, base + ["--control-video", vid, "--control-range", "0.6:0.2"]) == 2
  assert run_cli(sample.main, base + ["--control-video", str(tmp_path / "none.mp4")]) == 2
  assert run_cli(sample.main, ["--frames", "8"] + base[2:] + ["--control-video", vid]) == 2   # 4 < 8 frames
  err = capsys.readouterr().err
  for needle in ("give one control video per ControlNet", "need 0 <= START < END <= 1",
                 "file not found", "has 4 frames, the clip needs 8"):
    assert needle in err, (needle, err)
  from convert_weights.errors import ConversionError
  from convert_weights.motion_module_files import load_motion_module
  with pytest.raises(ConversionError, match="not a motion module: found controlnet_ldm"):
    load_motion_module(ldm)                                     # a ControlNet given as motion module
