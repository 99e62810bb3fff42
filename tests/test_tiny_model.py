"""The shipped built-in tiny model (adiff_jax/assets/tiny_model, issue 14), trained by our chain:
it must draw the prompted objects, its MotionLoRAs must be applied, and its motion module and a
MotionLoRA, exported to the official PyTorch formats, must give the same forward pass in the
PyTorch reference (diffusers UNetMotionModel, the LoRA merged the way the official code merges
it). These tests fail if the assets or the sampling path break.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

from adiff_jax import builtin, model_dir
from adiff_jax.data.synthetic import clip_coherence, object_color
from adiff_jax.motion_module import split_motion_module
from adiff_jax.sampling import Pipeline, SamplingConfig
from adiff_jax.unet import UNet3D
from convert_weights import io
from convert_weights.convert import to_torch
from convert_weights.motion_module_keys import is_pe_buffer
from convert_weights.tree import tree_to_state_dict
from torch_ref import patch_motion_norms_per_frame

# The renaming in diffusers' scripts/convert_animatediff_motion_module_to_diffusers.py.
DOCUMENTED_RENAMES = [(".norms.0", ".norm1"), (".norms.1", ".norm2"), (".ff_norm", ".norm3"),
                      (".attention_blocks.0", ".attn1"), (".attention_blocks.1", ".attn2"),
                      (".temporal_transformer", "")]
CASES = [("red", "circle"), ("blue", "square"), ("yellow", "triangle"), ("green", "circle")]


def documented_rename(key: str) -> str:
  for a, b in DOCUMENTED_RENAMES:
    key = key.replace(a, b)
  return key


def f32(tree):
  return {k: f32(v) for k, v in tree.items()} if isinstance(tree, dict) else np.asarray(tree, np.float32)


def test_shipped_model_is_complete_and_records_how_it_was_made():
  path = builtin.trained_model_dir()
  assert path is not None, f"no trained tiny model at {builtin.TRAINED_DIR}"
  meta = model_dir.read_metadata(path)
  assert set(meta["items"]) >= {"unet", "text_encoder", "vae", "motion_module"}
  with open(os.path.join(path, "TRAINING.md")) as f:
    recipe = f.read()
  assert "tools/train_tiny_chain.py" in recipe and "at commit" in recipe
  for cfg in ("tiny_vae.yaml", "tiny_image.yaml", "tiny.yaml", "tiny_motion_more.yaml",
              "tiny_motion_long.yaml", "tiny_motion_longer.yaml", "tiny_motion_lora.yaml"):
    assert f"configs/training/{cfg}" in recipe
    assert os.path.isfile(os.path.join("configs", "training", cfg))
  for d in builtin.MOTION_LORAS:
    assert f"tiny_lora_{d}" in recipe
    assert "motion_lora_0" in model_dir.read_metadata(builtin.motion_lora_dir(f"builtin:{d}"))["items"]


def _sample(motion_loras=(), cases=CASES, steps=20):
  cfg, params, lora, _ = builtin.load(None, motion_loras)
  sc = SamplingConfig(frames=16, height=64, width=64, steps=steps, guidance_scale=7.5)
  videos = Pipeline(cfg, params, lora=lora)([f"a {c} {s}" for c, s in cases], seeds=list(range(len(cases))),
                                            cfg=sc, progress=False)
  return np.rint(np.asarray(videos) * 255).astype(np.uint8)


def test_shipped_model_draws_the_prompted_objects():
  """What the shipped model does today (bench/motion_eval.py has the full figures; it does NOT
  reach issue 14's coherence goal, see README): an object in nearly every frame, in the prompted
  colour, and at least one of the four clips one steadily moving object by the project's tracker
  (41% of 54 clips in bench/motion_eval.py with the shipped weights, 0% for the
  image model alone). Random weights or a broken sampling path give noise and fail this."""
  videos = _sample()
  tracks = [clip_coherence(v) for v in videos]
  present = [t["present"] for t in tracks]
  assert all(p >= 12 for p in present), present
  assert sum(t["coherent"] for t in tracks) >= 1, [t["reason"] for t in tracks]
  colored = [sum(object_color(f) == c for f in v) >= len(v) / 2 for v, (c, _) in zip(videos, CASES)]
  assert sum(colored) >= 2, colored   # 59% of 54 clips in bench/motion_eval.py; noise gives 0


def test_builtin_motion_lora_is_applied():
  """`builtin:left` at alpha 1 changes the video; at alpha 0 it is exactly the plain model (two
  clips, 8 steps: the property does not depend on how far sampling runs)."""
  plain = _sample(cases=CASES[:2], steps=8)
  off = _sample([("builtin:left", 0.0)], cases=CASES[:2], steps=8)
  on = _sample([("builtin:left", 1.0)], cases=CASES[:2], steps=8)
  assert np.abs(off.astype(int) - plain.astype(int)).max() <= 1     # rounding of an extra zero term at most
  assert np.abs(on.astype(int) - plain.astype(int)).mean() > 1.0


@torch.no_grad()
def test_official_exports_match_in_the_pytorch_reference(tmp_path):
  """Motion module and MotionLoRA `left`, exported by our converter in the official formats, in
  diffusers' UNetMotionModel (tiny config) with the LoRA merged as the official
  `convert_motion_lora_ckpt_to_diffusers` merges it: W += alpha * up @ down."""
  path = builtin.trained_model_dir()
  mm_file, lora_file = str(tmp_path / "mm_tiny.safetensors"), str(tmp_path / "lora_left.safetensors")
  to_torch(path, "motion_module", mm_file, "original")
  to_torch(builtin.motion_lora_dir("builtin:left"), "motion_lora", lora_file, "original")
  cfg, params, lora, _ = builtin.load(None, [("builtin:left", 1.0)])
  u, m = cfg.unet, cfg.motion

  # The image UNet in diffusers, from our tree in diffusers names.
  kinds = [("CrossAttn" if c else "") for c in u.cross_attention_levels]
  unet2d = UNet2DConditionModel(
      in_channels=u.in_channels, out_channels=u.out_channels, block_out_channels=u.block_out_channels,
      layers_per_block=u.layers_per_block, attention_head_dim=u.attention_heads,
      cross_attention_dim=u.cross_attention_dim, norm_num_groups=u.norm_num_groups,
      down_block_types=tuple(k + "DownBlock2D" for k in kinds),
      up_block_types=tuple(k + "UpBlock2D" for k in reversed(kinds)))
  image_unet = f32(split_motion_module(params["unet"])[0])
  unet2d.load_state_dict({k: torch.from_numpy(v) for k, v in tree_to_state_dict(image_unet).items()}, strict=True)

  # The motion module: the official file renamed as diffusers documents it, loaded strictly.
  adapter = MotionAdapter(block_out_channels=u.block_out_channels, motion_layers_per_block=u.layers_per_block,
                          motion_num_attention_heads=m.num_heads, motion_norm_num_groups=m.norm_groups,
                          motion_max_seq_length=m.max_len, use_motion_mid_block=m.mid_block)
  sd = {documented_rename(k): torch.from_numpy(np.asarray(v, np.float32))
        for k, v in io.load_torch_file(mm_file).items() if not is_pe_buffer(k)}
  result = adapter.load_state_dict(sd, strict=False)
  assert not result.unexpected_keys, result.unexpected_keys
  assert all(k.endswith("pos_embed.pe") for k in result.missing_keys), result.missing_keys
  ref = UNetMotionModel.from_unet2d(unet2d, adapter).eval()

  # The official MotionLoRA merge.
  lora_sd = io.load_torch_file(lora_file)
  assert lora_sd and all(".processor." in k for k in lora_sd)
  for key, down in lora_sd.items():
    if ".up." in key:
      continue
    up = lora_sd[key.replace(".down.", ".up.")]
    model_key = key.replace("processor.", "").replace("_lora", "").replace("down.", "").replace("up.", "")
    model_key = documented_rename(model_key.replace("to_out.", "to_out.0."))
    layer = ref.get_submodule(model_key.rsplit(".", 1)[0])
    layer.weight += 1.0 * torch.from_numpy(np.asarray(up, np.float32)) @ torch.from_numpy(np.asarray(down, np.float32))

  frames = 8
  patch_motion_norms_per_frame(ref, frames)   # the official per-frame motion GroupNorm
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, frames, 16, 16, u.in_channels)).astype(np.float32)
  t = np.array([900.0, 250.0], np.float32)
  ctx = rng.standard_normal((2, 77, u.cross_attention_dim)).astype(np.float32)
  x = torch.from_numpy(sample).permute(0, 4, 1, 2, 3)
  want = ref(x, torch.from_numpy(t), torch.from_numpy(np.repeat(ctx, frames, axis=0))).sample
  want = want.permute(0, 2, 3, 4, 1).numpy()
  got = np.asarray(UNet3D(u, m).apply({"params": f32(params["unet"]), "lora": f32(lora)}, sample, t, ctx))
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f"shipped model vs PyTorch reference with MotionLoRA left: {err:.2e}")
  assert err < 1e-4
  # The LoRA really acts in both: without it ours moves away from the merged reference.
  plain = np.asarray(UNet3D(u, m).apply({"params": f32(params["unet"])}, sample, t, ctx))
  assert np.abs(plain - want).max() / np.abs(want).max() > 1e-4


def test_shipped_model_48_frames_with_context_windows():
  """48 frames (more than the positional encoding's 32) through context windows of 16: the object stays
  in the video across the window seams (present in nearly every frame, by the project's tracker)
  and keeps the prompted colour as often as 16-frame clips do (half; two clips for CI time). The shipped model does
  not move its object coherently even at 16 frames (README), so steady motion across seams is
  not asserted."""
  from adiff_jax.context import ContextConfig
  cfg, params, lora, _ = builtin.load(None, [])
  sc = SamplingConfig(frames=48, height=64, width=64, steps=10, guidance_scale=7.5,
                      context=ContextConfig(context_length=16, overlap=4))
  cases = CASES[:2]
  videos = Pipeline(cfg, params, lora=lora)([f"a {c} {s}" for c, s in cases], seeds=[0, 1],
                                            cfg=sc, progress=False)
  videos = np.rint(np.asarray(videos) * 255).astype(np.uint8)
  present = [sum(clip_coherence(v[i:i + 16])["present"] for i in range(0, 48, 16)) for v in videos]
  assert all(p >= 45 for p in present), present
  colored = [sum(object_color(f) == c for f in v) >= len(v) / 2 for v, (c, _) in zip(videos, cases)]
  assert sum(colored) >= 1, colored
