"""SparseCtrl: parity with diffusers' SparseControlNetModel (motion norms patched per frame, as the
official code), UNet3D's ControlNet residuals vs UNetMotionModel, and the converters."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SparseControlNetModel

from adiff_jax.errors import InputError
from adiff_jax.motion_module import MotionModuleConfig
from adiff_jax.params import flatten
from adiff_jax.sparse_ctrl import (SparseControlNet, SparseCtrlConfig, init_from_unet, param_shapes,
                                   random_params, sparse_condition)
from adiff_jax.unet import UNet3D, UNetConfig
from convert_weights import io
from convert_weights.inspect_cmd import inspect
from convert_weights.sparse_ctrl_files import (export_sparse_ctrl, load_sparse_ctrl,
                                               sparse_ctrl_state_dict, tree_from_state_dict)
from torch_ref import (patch_motion_norms_per_frame, randomize_, tiny_unet_motion, to_numpy_sd,
                       unet_params_from_diffusers)

UNET = UNetConfig.tiny()
EMB = (8, 16, 16, 16)      # a cheap conditioning embedding with the published 3 stride-2 steps
B, F, S = 2, 4, 8          # batch, frames, latent size


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def ours_config(simplified: bool) -> SparseCtrlConfig:
  base = SparseCtrlConfig.rgb() if simplified else SparseCtrlConfig.scribble(conditioning_embedding_channels=EMB)
  return dataclasses.replace(base, motion=dataclasses.replace(base.motion, num_heads=2, norm_groups=8))


def torch_sparse_ctrl(simplified: bool, seed=0) -> SparseControlNetModel:
  torch.manual_seed(seed)
  m = SparseControlNetModel(
      in_channels=4, conditioning_channels=4 if simplified else 3, block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"), layers_per_block=2,
      attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8, motion_num_attention_heads=2,
      motion_max_seq_length=32, conditioning_embedding_out_channels=EMB,
      use_simplified_condition_embedding=simplified)
  return randomize_(m, seed).eval()


def inputs(cond_channels: int, r: int, seed=0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((B, F, S, S, 4)).astype(np.float32)
  t = np.array([10.0, 731.0], np.float32)
  ctx = rng.standard_normal((B, 7, 32)).astype(np.float32)
  keys = rng.standard_normal((B, 2, S * r, S * r, cond_channels)).astype(np.float32)
  cond, mask = sparse_condition(keys, [0, -1], F)
  return sample, t, ctx, np.asarray(cond), np.asarray(mask)


def run_torch_sparse_ctrl(m, sample, t, ctx, cond, mask, scale):
  to5 = lambda a: torch.from_numpy(np.array(a)).permute(0, 4, 1, 2, 3)  # (B, C, F, H, W)
  m5 = np.broadcast_to(mask[:, :, None, None, None], cond.shape[:4] + (1,))
  with torch.no_grad():
    down, mid = m(to5(sample), torch.from_numpy(t), torch.from_numpy(np.repeat(ctx, F, axis=0)),
                  to5(cond), conditioning_mask=to5(m5), conditioning_scale=scale, return_dict=False)
  back = lambda x: x.reshape(B, F, *x.shape[1:]).permute(0, 1, 3, 4, 2).numpy()
  return [back(d) for d in down], back(mid)


@pytest.mark.parametrize("simplified", [True, False], ids=["rgb", "scribble"])
def test_sparse_ctrl_matches_diffusers(simplified):
  ref = torch_sparse_ctrl(simplified)
  tree, cfg, unet = tree_from_state_dict(ref.state_dict(), "diffusers model",
                                         diffusers_cfg=dict(ref.config))
  assert cfg == ours_config(simplified) and unet == UNET
  patch_motion_norms_per_frame(ref, F)        # official: motion-module GroupNorm per frame
  sample, t, ctx, cond, mask = inputs(cfg.conditioning_channels, cfg.condition_factor)
  want_down, want_mid = run_torch_sparse_ctrl(ref, sample, t, ctx, cond, mask, 0.7)
  run = jax.jit(SparseControlNet(cfg, UNET).apply)
  got_down, got_mid = run({"params": tree}, sample, t, ctx, cond, mask, 0.7)
  assert len(got_down) == len(want_down) == 6   # conv_in, 2 + downsampler, 2
  errs = [rel_err(g, w) for g, w in zip(got_down + [got_mid], want_down + [want_mid])]
  print(f"SparseCtrl {cfg.kind}: max rel err {max(errs):.2e}")
  assert max(errs) < 1e-4
  # The noisy sample is ignored (zeroed), the condition is not.
  again, _ = run({"params": tree}, sample * 3, t, ctx, cond, mask, 0.7)
  np.testing.assert_array_equal(np.asarray(again[3]), np.asarray(got_down[3]))
  other, _ = run({"params": tree}, sample, t, ctx, cond * 2, mask, 0.7)
  assert rel_err(other[3], got_down[3]) > 1e-3


def torch_unet_motion(seed=1):
  return tiny_unet_motion(seed)[0]


def test_unet_residuals_match_diffusers_unet_motion_model():
  ref = torch_unet_motion()
  params = unet_params_from_diffusers(ref)
  patch_motion_norms_per_frame(ref, F)
  mm = MotionModuleConfig.v3(num_heads=2, norm_groups=8)
  model = UNet3D(UNET, mm)
  sample, t, ctx, _, _ = inputs(4, 1)
  rng = np.random.default_rng(3)
  shapes = [(B, F, 8, 8, 32)] * 3 + [(B, F, 4, 4, 32)] + [(B, F, 4, 4, 64)] * 2
  down = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  mid = rng.standard_normal((B, F, 4, 4, 64)).astype(np.float32)
  to_t = lambda a: torch.from_numpy(a).reshape(B * F, *a.shape[2:]).permute(0, 3, 1, 2)
  with torch.no_grad():
    out = ref(torch.from_numpy(sample).permute(0, 4, 1, 2, 3), torch.from_numpy(t),
              torch.from_numpy(np.repeat(ctx, F, axis=0)),
              down_block_additional_residuals=tuple(to_t(d) for d in down),
              mid_block_additional_residual=to_t(mid)).sample
  want = out.permute(0, 2, 3, 4, 1).numpy()
  run = jax.jit(model.apply)
  got = run({"params": params}, sample, t, ctx, down, mid)
  err = rel_err(got, want)
  print(f"UNet3D + residuals: rel err {err:.2e}")
  assert err < 1e-4
  plain = run({"params": params}, sample, t, ctx)
  assert rel_err(plain, want) > 1e-2                           # the residuals really act
  zeros = run({"params": params}, sample, t, ctx, [np.zeros_like(d) for d in down], np.zeros_like(mid))
  assert rel_err(zeros, plain) < 1e-6
  with pytest.raises(InputError, match="down_residuals"):
    model.apply({"params": params}, sample, t, ctx, down[:-1], mid)
  with pytest.raises(InputError, match="together"):
    model.apply({"params": params}, sample, t, ctx, down, None)


def test_sparse_ctrl_residuals_drive_unet_end_to_end():
  """The residuals fit UNet3D as they are (shapes, order), and a zero-init SparseCtrl adds nothing."""
  cfg = ours_config(True)
  mm = MotionModuleConfig.v3(num_heads=2, norm_groups=8)
  unet_params = unet_params_from_diffusers(torch_unet_motion())
  fresh = init_from_unet(cfg, UNET, unet_params, seed=0)
  assert np.array_equal(flatten(fresh)["down_blocks_1/resnets_0/conv1/kernel"],
                        flatten(unet_params)["down_blocks_1/resnets_0/conv1/kernel"])
  sample, t, ctx, cond, mask = inputs(4, 1)
  down, mid = SparseControlNet(cfg, UNET).apply({"params": fresh}, sample, t, ctx, cond, mask)
  assert all(not np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))
  model = UNet3D(UNET, mm)
  a = model.apply({"params": unet_params}, sample, t, ctx, down, mid)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(model.apply({"params": unet_params}, sample, t, ctx)))


def test_param_counts_match_diffusers_full_size():
  """Full SD1.5 SparseCtrl trees have diffusers' parameter counts (torch on the meta device)."""
  for cfg, kw in ((SparseCtrlConfig.rgb(), dict(conditioning_channels=4, use_simplified_condition_embedding=True)),
                  (SparseCtrlConfig.scribble(), dict(conditioning_channels=3, use_simplified_condition_embedding=False))):
    with torch.device("meta"):
      ref = SparseControlNetModel(**kw)
    ours = sum(int(np.prod(v.shape)) for v in flatten(param_shapes(cfg, UNetConfig.sd15())).values())
    assert ours == sum(p.numel() for p in ref.parameters())


# ------------------------------------------------------------------------------ converters


def official_layout(sd: dict) -> dict:
  """The official key layout, written out here independently of the converter's table."""
  out = {}
  for k, v in sd.items():
    if ".motion_modules." in k:
      head, rest = k.split(".motion_modules.", 1)
      n, rest = rest.split(".", 1)
      rest = (rest.replace("transformer_blocks.0.pos_embed.pe", "transformer_blocks.0.attention_blocks.0.pos_encoder.pe")
              .replace(".attn1.", ".attention_blocks.0.").replace(".norm1.", ".norms.0.")
              .replace(".norm3.", ".ff_norm."))
      k = f"{head}.motion_modules.{n}.temporal_transformer.{rest}"
    out[k] = v
  return out


@pytest.mark.parametrize("simplified", [True, False], ids=["rgb", "scribble"])
def test_official_file_loads_and_matches_diffusers_tree(tmp_path, simplified):
  ref = torch_sparse_ctrl(simplified, seed=4)
  dtree, dcfg, _ = tree_from_state_dict(ref.state_dict(), diffusers_cfg=dict(ref.config))
  official = official_layout(ref.state_dict())
  for k in ("down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight",
            "down_blocks.1.motion_modules.1.temporal_transformer.transformer_blocks.0.ff_norm.weight",
            "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe",
            "controlnet_down_blocks.5.weight", "controlnet_mid_block.bias", "time_embedding.linear_1.weight",
            "controlnet_cond_embedding.weight" if simplified else "controlnet_cond_embedding.blocks.5.weight"):
    assert k in official, k
  path = str(tmp_path / f"v3_sd15_sparsectrl_{'rgb' if simplified else 'scribble'}.ckpt")
  torch.save({"controlnet": official}, path)          # wrapped as the official loader expects
  info = {}
  tree, cfg, unet = load_sparse_ctrl(path, overrides={"unet": dict(attention_heads=2, norm_num_groups=8),
                                                      "motion": dict(num_heads=2, norm_groups=8)}, info=info)
  assert info["format"] == "original" and cfg == dcfg and unet == UNET
  a, b = flatten(tree), flatten(dtree)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # Round trip to the same file layout: bit-exact, buffers included.
  back = sparse_ctrl_state_dict(tree, cfg, "original", info["extras"])
  want = {k: v.numpy() for k, v in official.items()}
  assert back.keys() == want.keys() and all(np.array_equal(back[k], want[k]) for k in want)
  text = inspect(path)
  name = "SparseCtrl RGB" if simplified else "SparseCtrl scribble"
  assert f"model: {name}" in text and "format: sparse_ctrl_original" in text, text
  assert "conversion check: ok" in text, text
  # "state_dict"-wrapped (diffusers' conversion script) reads the same.
  p2 = str(tmp_path / "wrapped.ckpt")
  torch.save({"state_dict": official}, p2)
  t2, _, _ = load_sparse_ctrl(p2, overrides={"unet": dict(attention_heads=2, norm_num_groups=8),
                                             "motion": dict(num_heads=2, norm_groups=8)})
  assert all(np.array_equal(flatten(t2)[k], a[k]) for k in a)


def test_diffusers_round_trip_and_folder_loads_in_diffusers(tmp_path):
  ref = torch_sparse_ctrl(False, seed=6)
  sd = to_numpy_sd(ref)
  info = {}
  tree, cfg, unet = tree_from_state_dict(ref.state_dict(), diffusers_cfg=dict(ref.config), info=info)
  assert info["format"] == "diffusers"
  back = sparse_ctrl_state_dict(tree, cfg, "diffusers", info["extras"])
  assert back.keys() == sd.keys() and all(np.array_equal(back[k], sd[k]) for k in sd)
  # bf16 survives bit-exactly too.
  bf = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
  tb, _, _ = tree_from_state_dict(bf, diffusers_cfg=dict(ref.config), info=(ib := {}))
  back = sparse_ctrl_state_dict(tb, cfg, "diffusers", ib["extras"])
  assert all(np.array_equal(back[k].view(np.int16), io.tensor_to_numpy(bf[k]).view(np.int16)) for k in bf)
  # Our export is a folder diffusers loads (strict), with the same weights; and we load it back.
  out = str(tmp_path / "sparsectrl_diffusers")
  export_sparse_ctrl(tree, cfg, unet, out, "diffusers")
  loaded = SparseControlNetModel.from_pretrained(out)
  got = to_numpy_sd(loaded)
  assert got.keys() == sd.keys() and all(np.array_equal(got[k], sd[k]) for k in sd)
  t3, c3, u3 = load_sparse_ctrl(out)
  assert c3 == cfg and u3 == unet
  assert "model: SparseCtrl scribble" in inspect(out)
  # Original export without stored buffers writes none unless asked; with_pe computes them.
  plain = sparse_ctrl_state_dict(tree, cfg, "original")
  assert not any(k.endswith(".pe") for k in plain)
  withpe = sparse_ctrl_state_dict(tree, cfg, "original", with_pe=True)
  pe = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"
  np.testing.assert_array_equal(withpe[pe], sd["down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe"])


def test_not_a_sparse_ctrl_is_refused(tmp_path):
  path = str(tmp_path / "mm.safetensors")
  io.save_torch_file({"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": np.zeros((4, 4), np.float32)}, path)
  with pytest.raises(InputError, match="not a SparseCtrl"):
    load_sparse_ctrl(path)


# ------------------------------------------------------------------------------ inputs


def test_sparse_condition_and_bad_inputs():
  k = np.arange(2 * 2 * 1 * 1 * 3, dtype=np.float32).reshape(2, 2, 1, 1, 3) + 1
  cond, mask = sparse_condition(k, [1, -1], 5)
  assert cond.shape == (2, 5, 1, 1, 3)
  np.testing.assert_array_equal(mask, [[0, 1, 0, 0, 1]] * 2)
  np.testing.assert_array_equal(cond[:, 4], k[:, 1])
  assert not np.any(np.asarray(cond[:, [0, 2, 3]]))
  for idx, match in (([0], "keyframes but"), ([0, 5], "outside"), ([1, -4], "same frame")):
    with pytest.raises(InputError, match=match):
      sparse_condition(k, idx, 5)
  cfg = ours_config(False)
  model = SparseControlNet(cfg, UNET)
  args = dict(sample=(B, F, S, S, 4), t=(B,), ctx=(B, 7, 32), cond=(B, F, 8 * S, 8 * S, 3), mask=(B, F))
  for bad, match in ((dict(cond=(B, F, S, S, 3)), "condition must be"), (dict(mask=(B, 3)), "mask must be"),
                     (dict(sample=(B, 40, S, S, 4), cond=(B, 40, 8 * S, 8 * S, 3), mask=(B, 40)), "positional"),
                     (dict(ctx=(B, 7, 16)), "text context")):
    shapes = {**args, **bad}
    with pytest.raises(InputError, match=match):
      jax.eval_shape(model.init, jax.random.key(0), *[jax.ShapeDtypeStruct(shapes[n], jnp.float32)
                                                      for n in ("sample", "t", "ctx", "cond", "mask")])
  with pytest.raises(InputError, match="inflated"):
    SparseCtrlConfig.rgb(motion=MotionModuleConfig.v1())
  with pytest.raises(InputError, match="preset"):
    SparseCtrlConfig.preset("depth")
  zero = random_params(cfg, UNET)
  assert not np.any(flatten(zero)["controlnet_mid_block/kernel"])
  assert not np.any(flatten(zero)["controlnet_cond_embedding/conv_out/kernel"])
  assert np.any(flatten(zero)["controlnet_cond_embedding/conv_in/kernel"])
