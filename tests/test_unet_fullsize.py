"""Full-size check: SD1.5 UNet + v2 motion modules (random weights), 16 frames at 32x32 latents,
against diffusers UNetMotionModel patched to the official semantics. Slow (~5 min, ~14 GB RAM)."""
import gc

import jax
import numpy as np
import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

from adiff_jax.motion_module import MotionModuleConfig
from adiff_jax.unet import UNet3D, UNetConfig
from torch_ref import patch_motion_norms_per_frame, randomize_, unet_params_from_diffusers

pytestmark = pytest.mark.slow


def test_sd15_v2_matches_diffusers_full_size():
  f, s = 16, 32
  unet2d = UNet2DConditionModel(
      sample_size=64, cross_attention_dim=768, attention_head_dim=8,
      block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
  adapter = MotionAdapter(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                          motion_mid_block_layers_per_block=1, motion_num_attention_heads=8,
                          motion_norm_num_groups=32, motion_max_seq_length=32,
                          use_motion_mid_block=True)
  ref = UNetMotionModel.from_unet2d(unet2d, adapter)
  del unet2d, adapter
  randomize_(ref, 0).eval()
  params = unet_params_from_diffusers(ref)
  patch_motion_norms_per_frame(ref, f)

  rng = np.random.default_rng(0)
  sample = rng.standard_normal((1, f, s, s, 4)).astype(np.float32)
  t = np.array([421.0], np.float32)
  ctx = rng.standard_normal((1, 77, 768)).astype(np.float32)
  with torch.no_grad():
    out = ref(torch.from_numpy(sample).permute(0, 4, 1, 2, 3), torch.from_numpy(t),
              torch.from_numpy(np.repeat(ctx, f, axis=0))).sample
  want = out.permute(0, 2, 3, 4, 1).numpy()
  del ref, out
  gc.collect()

  model = UNet3D(UNetConfig.sd15(), MotionModuleConfig.v2())
  got = np.asarray(jax.jit(model.apply)({"params": params}, sample, t, ctx))
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f"SD1.5 + v2, 16x32x32: max abs err / output scale = {err:.2e}")
  assert err < 1e-4
