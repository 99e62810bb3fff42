"""The shipped trained tiny model (adiff_jax/assets/tiny_model, issue 7).

Its motion module, exported by the converter in the original AnimateDiff format and renamed the
way diffusers' `convert_animatediff_motion_module_to_diffusers.py` documents it, must load into
diffusers' MotionAdapter with no missing or unexpected keys and the same values. And it must
still move things as prompted on a few fixed prompts (a cheap slice of bench/motion_eval.py).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import MotionAdapter

from adiff_jax import builtin
from adiff_jax.data.synthetic import motion_direction
from adiff_jax.pipeline import Pipeline, SamplingConfig
from convert_weights import io, motion, orbax_io
from convert_weights.motion_module import is_pe_buffer

# The renaming in diffusers' scripts/convert_animatediff_motion_module_to_diffusers.py.
DOCUMENTED_RENAMES = [(".norms.0", ".norm1"), (".norms.1", ".norm2"), (".ff_norm", ".norm3"),
                      (".attention_blocks.0", ".attn1"), (".attention_blocks.1", ".attn2"),
                      (".temporal_transformer", "")]


def documented_rename(key: str) -> str:
  for a, b in DOCUMENTED_RENAMES:
    key = key.replace(a, b)
  return key


# Until a trained model ships (issue 7 is open), there is nothing to check: skipped, visibly.
pytestmark = pytest.mark.skipif(builtin.trained_model_dir() is None,
                                reason=f"no trained tiny model at {builtin.TRAINED_DIR} yet (issue 7 open)")


@pytest.fixture(scope="module")
def shipped():
  path = builtin.trained_model_dir()
  items, meta = orbax_io.load_model_dir(path)
  return path, items, meta


def test_shipped_model_records_how_it_was_made(shipped):
  path, items, meta = shipped
  assert set(items) >= {"unet", "text_encoder", "vae", "motion_module"}
  with open(os.path.join(path, "TRAINING.md")) as f:
    recipe = f.read()
  for cfg in ("tiny_vae.yaml", "tiny_image.yaml", "tiny.yaml"):
    assert f"configs/training/{cfg}" in recipe
    assert os.path.isfile(os.path.join("configs", "training", cfg))
  assert meta["configs"]["motion_module"]["max_len"] >= 16


def test_motion_module_original_export_loads_in_motion_adapter(shipped, tmp_path):
  _, items, meta = shipped
  cfg = orbax_io.motion_config_from_meta(meta)
  out = str(tmp_path / "mm_tiny.safetensors")
  motion.export_motion_module(items["motion_module"], cfg, out, fmt="original", with_pe=True)
  original = io.load_torch_file(out)
  assert any(".temporal_transformer." in k for k in original)

  renamed = {}
  for k, v in original.items():
    if is_pe_buffer(k):
      # The script drops pos_encoder buffers (MotionAdapter recomputes them); keep one per
      # block as `pos_embed.pe` instead, so a strict load also checks the sinusoid table.
      if ".attention_blocks.0." in k:
        renamed[documented_rename(k.replace(".attention_blocks.0.pos_encoder.", ".pos_embed."))] = v
      continue
    renamed[documented_rename(k)] = v

  m = meta["configs"]["motion_module"]
  unet = meta["configs"]["unet"]
  adapter = MotionAdapter(block_out_channels=tuple(unet["block_out_channels"]),
                          motion_layers_per_block=unet["layers_per_block"],
                          motion_num_attention_heads=m["num_heads"], motion_norm_num_groups=m["norm_groups"],
                          motion_max_seq_length=m["max_len"], use_motion_mid_block=m["mid_block"])
  result = adapter.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in renamed.items()},
                                   strict=False)
  assert not result.missing_keys, result.missing_keys
  assert not result.unexpected_keys, result.unexpected_keys
  loaded = adapter.state_dict()
  for k, v in renamed.items():
    np.testing.assert_array_equal(loaded[k].numpy(), np.asarray(v, np.float32), err_msg=k)


def test_shipped_model_moves_as_prompted(shipped):
  """A 4-prompt slice of bench/motion_eval.py (which reports the full figures)."""
  import sample
  cfg, params, lora, _ = sample.load_model(sample.parse_args([]))
  cases = [("red", "circle", "left"), ("blue", "square", "up"),
           ("yellow", "triangle", "right"), ("green", "circle", "down")]
  sc = SamplingConfig(frames=16, height=64, width=64, steps=20, guidance_scale=7.5)
  videos = Pipeline(cfg, params, lora=lora)([f"a {c} {s} moving {d}" for c, s, d in cases],
                                            seeds=[0, 1, 2, 3], cfg=sc, progress=False)
  # Colour-blind tracking, as bench/motion_eval.py (a trail or a hue shift must not hide the motion).
  got = [motion_direction(np.rint(np.asarray(v) * 255).astype(np.uint8)) for v in videos]
  assert sum(g == d for g, (_, _, d) in zip(got, cases)) >= 3, (got, cases)
