"""SparseCtrl in the sampling pipeline: parity with diffusers AnimateDiffSparseControlNetPipeline
(tiny random weights, same latents, same VAE draw for RGB keyframes), context windows, errors."""
import dataclasses

import numpy as np
import pytest
import torch

from adiff_jax.context import ContextConfig
from adiff_jax.errors import InputError
from adiff_jax.sampling import Pipeline, SamplingConfig, SparseCtrlSampling
from torch_ref import patch_motion_norms_per_frame, randomize_, tiny_animatediff

F, H, W, STEPS, INDICES = 8, 32, 32, 3, [0, 5]
EMB = (8, 16, 16)   # scribble embedding with two stride-2 steps: the tiny VAE's factor 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return tiny_animatediff(tmp_path_factory.mktemp("tok"))


def torch_sparse_ctrl(kind: str, seed=5):
  from diffusers import SparseControlNetModel
  torch.manual_seed(seed)
  m = SparseControlNetModel(
      in_channels=4, conditioning_channels=4 if kind == "rgb" else 3, block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"), layers_per_block=2,
      attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8, motion_num_attention_heads=2,
      motion_max_seq_length=32, conditioning_embedding_out_channels=EMB,
      use_simplified_condition_embedding=kind == "rgb")
  return randomize_(m, seed).eval()


def sparse_ctrl_pair(kind: str):
  """(torch SparseControlNetModel with per-frame motion norms, our (SparseCtrlConfig, tree))."""
  from convert_weights.sparse_ctrl_files import tree_from_state_dict
  ref = torch_sparse_ctrl(kind)
  tree, cfg, _ = tree_from_state_dict(ref.state_dict(), "diffusers model", diffusers_cfg=dict(ref.config))
  patch_motion_norms_per_frame(ref, F)       # official: motion-module GroupNorm per frame
  return ref, (cfg, tree)


def keyframes(seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(0, 1, (len(INDICES), H, W, 3)).astype(np.float32)   # (K, H, W, 3) in [0, 1]


@pytest.mark.parametrize("kind", ["rgb", "scribble"])
def test_sparse_ctrl_pipeline_matches_diffusers(reference, kind, monkeypatch):
  from diffusers import AnimateDiffSparseControlNetPipeline
  import diffusers.pipelines.animatediff.pipeline_animatediff_sparsectrl as dsc
  cfg, params, pipe = reference
  ref_ctrl, ctrl = sparse_ctrl_pair(kind)
  sc = SamplingConfig(frames=F, height=H, width=W, steps=STEPS, guidance_scale=7.5,
                      sparse_ctrl=SparseCtrlSampling(conditioning_scale=0.8))
  ours = Pipeline(cfg, params, sparse_ctrl=ctrl)
  imgs = keyframes()
  f = cfg.latent_factor
  vae_noise = np.random.default_rng(1).standard_normal((1, len(INDICES), H // f, W // f, 4)).astype(np.float32)
  control = ours.sparse_condition(imgs[None], INDICES, sc, vae_noise=vae_noise)
  noise = np.array(ours.initial_noise([4], sc))
  got = ours(["a red circle moving left"], ["blurry"], seeds=[4], cfg=sc, noise=noise,
             progress=False, control=control)

  # The same VAE draw on the diffusers side (it samples the posterior, as the official script).
  eps = torch.from_numpy(vae_noise[0]).permute(0, 3, 1, 2)
  monkeypatch.setattr(dsc, "retrieve_latents",
                      lambda out, generator=None, sample_mode="sample":
                      out.latent_dist.mean + out.latent_dist.std * eps)
  dpipe = AnimateDiffSparseControlNetPipeline(
      vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
      motion_adapter=pipe.motion_adapter, controlnet=ref_ctrl, scheduler=pipe.scheduler)
  # Its check takes the K keyframes of a tensor for an image batch; the pipeline itself is fine.
  monkeypatch.setattr(dpipe, "check_image", lambda *a, **k: None)
  with torch.no_grad():
    out = dpipe(prompt="a red circle moving left", negative_prompt="blurry", num_frames=F,
                height=H, width=W, num_inference_steps=STEPS, guidance_scale=7.5, output_type="pt",
                conditioning_frames=torch.from_numpy(imgs).permute(0, 3, 1, 2),
                controlnet_frame_indices=INDICES, controlnet_conditioning_scale=0.8,
                latents=torch.from_numpy(noise).permute(0, 4, 1, 2, 3)).frames
  want = out.permute(0, 1, 3, 4, 2).numpy()
  err = np.abs(got - want).max()
  plain = ours(["a red circle moving left"], ["blurry"], seeds=[4], noise=noise, progress=False,
               cfg=dataclasses.replace(sc, sparse_ctrl=None))
  effect = np.abs(plain - want).max()
  print(f"SparseCtrl {kind} pipeline: max abs err {err:.2e} (without SparseCtrl: {effect:.2e})")
  assert got.shape == want.shape == (1, F, H, W, 3)
  assert effect > 1e-2        # the SparseCtrl really acts
  assert err < 1e-4


def test_sparse_ctrl_context_windows_and_errors(reference):
  """Windows slice the condition and mask per frame: one window covering all frames equals no
  windows; windows over 8 frames run; bad inputs fail clearly."""
  cfg, params, _ = reference
  _, ctrl = sparse_ctrl_pair("scribble")
  sc = SamplingConfig(frames=F, height=H, width=W, steps=2, sparse_ctrl=SparseCtrlSampling())
  pipe = Pipeline(cfg, params, sparse_ctrl=ctrl)
  control = pipe.sparse_condition(keyframes()[None], INDICES, sc)
  cond, mask = (np.asarray(a) for a in control)
  assert cond.shape == (1, F, H, W, 3) and mask.tolist() == [[1, 0, 0, 0, 0, 1, 0, 0]]
  np.testing.assert_array_equal(cond[0, 5], keyframes()[1])
  args = (["a red circle"], [""], [1])
  a = pipe(*args, cfg=sc, progress=False, control=control)
  whole = dataclasses.replace(sc, context=ContextConfig(context_length=F, overlap=2))
  b = pipe(*args, cfg=whole, progress=False, control=control)
  np.testing.assert_allclose(a, b, atol=1e-5)
  win = dataclasses.replace(sc, context=ContextConfig(context_length=4, overlap=2))
  c = pipe(*args, cfg=win, progress=False, control=control)
  assert np.isfinite(c).all() and np.abs(c - a).max() > 1e-4
  with pytest.raises(InputError, match="control"):
    pipe(*args, cfg=sc, progress=False)
  with pytest.raises(InputError, match="condition must be"):
    pipe(*args, cfg=sc, progress=False, control=(cond[:, :4], mask[:, :4]))
  with pytest.raises(InputError, match="outside"):
    pipe.sparse_condition(keyframes()[None], [0, 8], sc)
  with pytest.raises(InputError, match="keyframe images"):
    pipe.sparse_condition(keyframes()[None, :, :16], INDICES, sc)
  with pytest.raises(InputError, match="no SparseCtrl"):
    Pipeline(cfg, params).check(sc)
  rgb_cfg, rgb_tree = sparse_ctrl_pair("rgb")[1]
  with pytest.raises(InputError, match="do not fit"):
    Pipeline(cfg, params, sparse_ctrl=(ctrl[0], rgb_tree))


SHARDED_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"  # unoptimised LLVM: half the compile time, both sides
os.environ["JAX_PLATFORMS"] = "cpu"
import dataclasses
import jax, numpy as np
from adiff_jax.context import ContextConfig
from adiff_jax.model import ModelConfig, random_params
from adiff_jax.params import random_like
from adiff_jax.sampling import Pipeline, SamplingConfig, SparseCtrlSampling
from adiff_jax.sharding import make_mesh
from adiff_jax.sparse_ctrl import SparseCtrlConfig, param_shapes
from adiff_jax import controlnet as cn
cfg = ModelConfig.tiny()
params = random_params(cfg, seed=0)
ctrl_cfg = SparseCtrlConfig.scribble(conditioning_embedding_channels=(8, 16, 16))
ctrl = (ctrl_cfg, random_like(param_shapes(ctrl_cfg, cfg.unet), 3))   # no zero convs: it acts
sc = SamplingConfig(frames=8, height=32, width=32, steps=2, sparse_ctrl=SparseCtrlSampling(0.9))
imgs = np.random.default_rng(0).uniform(0, 1, (1, 2, 32, 32, 3)).astype(np.float32)
# A dense ControlNet beside the SparseCtrl (residuals summed): its frames are sharded too.
cn_cfg = cn.ControlNetConfig(conditioning_embedding_channels=(8, 16, 16))
nets = [(cn_cfg, cfg.unet, random_like(cn.param_shapes(cn_cfg, cfg.unet), 4))]
video = [np.random.default_rng(1).uniform(0, 1, (1, 8, 32, 32, 3)).astype(np.float32)]
# With windows only (the conditions are sliced per window and the windows sharded): the plain
# sharded path is the same code with one window, and CI time is short.
for c in (dataclasses.replace(sc, context=ContextConfig(context_length=4, overlap=2)),):
  one = Pipeline(cfg, params, sparse_ctrl=ctrl, controlnets=nets)
  a = one(["a red circle"], [""], [1], c, progress=False, control=one.sparse_condition(imgs, [0, 5], c),
          controlnet_frames=video)
  eight = Pipeline(cfg, params, sparse_ctrl=ctrl, controlnets=nets, mesh=make_mesh(frames=4))   # data=2 x frames=4
  b = eight(["a red circle"], [""], [1], c, progress=False, control=eight.sparse_condition(imgs, [0, 5], c),
            controlnet_frames=video)
  err = float(np.abs(a - b).max())
  print("sharded SparseCtrl + ControlNet pipeline max abs err", err, "windows" if c.context else "")
  assert err < 1e-5, err
"""


def test_sharded_control_pipeline_8_devices_equals_single_device():
  import os, subprocess, sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stdout + r.stderr[-3000:]
  print(r.stdout)
