"""Full-size checks against diffusers UNetMotionModel (random weights): SD1.5 UNet + v2 motion
modules, 16 frames at 32x32 latents, patched to the official semantics (slow: ~5 min, ~14 GB RAM);
SDXL at full depth and real conditioning widths, reduced channel width (~1.5 min, ~2.7 GB peak)."""
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


def test_sdxl_full_depth_reduced_width_matches_diffusers():
  """SDXL at full depth and real conditioning widths but 1/5 of the channels (64/128/256, head dim
  64 -> heads 1/2/4): no transformers at level 0, 2 and 10 blocks at levels 1 and 2, 10 in the mid
  block, linear projections, 2048-wide context, pooled text 1280 + 6 time ids x 256, the SDXL motion
  module (3 levels, no mid block, GroupNorm pooled over frames: diffusers pools too, so the
  reference runs unpatched); random weights, 2 frames at 16x16 latents. Full-size SDXL in fp32 needs
  ~20 GB for both frameworks; this is ~0.2 B parameters (well under 8 GB peak)."""
  import resource
  from diffusers import UNet2DConditionModel
  from adiff_jax.params import flatten
  channels, heads, f, s = (64, 128, 256), (1, 2, 4), 2, 16
  unet2d = UNet2DConditionModel(
      sample_size=s, block_out_channels=channels, attention_head_dim=heads, layers_per_block=2,
      transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
      addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
  adapter = MotionAdapter(block_out_channels=channels, motion_layers_per_block=2, motion_num_attention_heads=8,
                          motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False)
  ref = UNetMotionModel.from_unet2d(unet2d, adapter)
  del unet2d, adapter
  randomize_(ref, 0).eval()
  params = unet_params_from_diffusers(ref)
  n = sum(int(np.prod(np.shape(v))) for v in flatten(params).values())
  blocks = {k.split("/transformer_blocks_")[0] + "/" + k.split("/transformer_blocks_")[1].split("/")[0]
            for k in flatten(params) if "/transformer_blocks_" in k and "motion_modules" not in k}
  assert len(blocks) == 2 * 2 + 2 * 10 + 10 + 3 * 2 + 3 * 10, len(blocks)   # down, mid, up

  rng = np.random.default_rng(0)
  sample = rng.standard_normal((1, f, s, s, 4)).astype(np.float32)
  t = np.array([421.0], np.float32)
  ctx = rng.standard_normal((1, 77, 2048)).astype(np.float32)
  added = {"text_embeds": rng.standard_normal((1, 1280)).astype(np.float32),
           "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32)}
  with torch.no_grad():
    out = ref(torch.from_numpy(sample).permute(0, 4, 1, 2, 3), torch.from_numpy(t),
              torch.from_numpy(np.repeat(ctx, f, axis=0)),
              added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample
  want = out.permute(0, 2, 3, 4, 1).numpy()
  del ref, out
  gc.collect()

  config = UNetConfig.sdxl(block_out_channels=channels, attention_heads=heads)
  assert config.depths == (1, 2, 10) and config.cross_attention_levels == (False, True, True)
  model = UNet3D(config, MotionModuleConfig.sdxl())
  got = np.asarray(jax.jit(model.apply)({"params": params}, sample, t, ctx, added_cond=added))
  err = np.abs(got - want).max() / np.abs(want).max()
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"SDXL full depth, reduced width ({n:,} parameters), {f}x{s}x{s}: max abs err / output scale "
        f"= {err:.2e}; process peak RSS {peak:.1f} GB")
  assert err < 1e-4
