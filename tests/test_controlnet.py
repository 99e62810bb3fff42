"""Dense ControlNet: parity with diffusers' ControlNetModel run on the B*F frames (as
AnimateDiffControlNetPipeline runs it), the residuals' fit to UNet3D, and the converters (LDM with
and without `control_model.`, v1.0 full files, diffusers folders / files), detect / inspect, errors."""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

from adiff_jax.controlnet import (ControlNet, ControlNetConfig, check_compatible, check_params,
                                  guess_mode_scales, init_from_unet, param_shapes, random_params)
from adiff_jax.errors import InputError
from adiff_jax.params import flatten
from adiff_jax.unet import UNet3D, UNetConfig
from convert_weights import io
from convert_weights.detect import detect_keys
from convert_weights.inspect_cmd import inspect
from convert_weights.controlnet_files import (controlnet_state_dict, export_controlnet, load_controlnet,
                                             tree_from_state_dict)
from torch_ref import tiny_controlnet, to_numpy_sd

UNET = UNetConfig.tiny()
CFG = ControlNetConfig(conditioning_embedding_channels=(8, 16, 16, 16))
B, F, S = 2, 3, 8          # batch, frames, latent size (control images 8x: 64x64)
_APPLY = jax.jit(ControlNet(CFG, UNET).apply)


def RUN(variables, sample, t, ctx, cond, scale, guess_mode=False):
  """The one compiled program of these tests (scale and guess mode are traced inputs)."""
  return _APPLY(variables, sample, t, ctx, cond, scale, guess_mode)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((B, F, S, S, 4)).astype(np.float32)
  t = np.array([10.0, 731.0], np.float32)
  ctx = rng.standard_normal((B, 7, 32)).astype(np.float32)
  cond = rng.random((B, F, 8 * S, 8 * S, 3)).astype(np.float32)
  return sample, t, ctx, cond


def run_torch(m, sample, t, ctx, cond, scale, guess_mode=False):
  """diffusers ControlNetModel on the B*F frames, text and timestep repeated per frame."""
  frames = lambda a: torch.from_numpy(a.reshape(B * F, *a.shape[2:])).permute(0, 3, 1, 2)
  with torch.no_grad():
    down, mid = m(frames(sample), torch.from_numpy(np.repeat(t, F)), torch.from_numpy(np.repeat(ctx, F, axis=0)),
                  frames(cond), conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
  back = lambda x: x.permute(0, 2, 3, 1).reshape(B, F, x.shape[2], x.shape[3], x.shape[1]).numpy()
  return [back(d) for d in down], back(mid)


@pytest.mark.parametrize("guess_mode", [False, True], ids=["plain", "guess_mode"])
def test_controlnet_matches_diffusers_per_frame(guess_mode):
  ref = tiny_controlnet(0)
  tree, cfg, unet = tree_from_state_dict(ref.state_dict(), "diffusers model", diffusers_cfg=dict(ref.config))
  assert cfg == CFG and unet == UNET
  sample, t, ctx, cond = inputs()
  want_down, want_mid = run_torch(ref, sample, t, ctx, cond, 0.7, guess_mode)
  got_down, got_mid = RUN({"params": tree}, sample, t, ctx, cond, 0.7, guess_mode)
  assert len(got_down) == len(want_down) == 6   # conv_in, 2 + downsampler, 2
  errs = [rel_err(g, w) for g, w in zip(got_down + [got_mid], want_down + [want_mid])]
  print(f"ControlNet ({'guess mode' if guess_mode else 'plain'}): max rel err {max(errs):.2e}")
  assert max(errs) < 1e-4
  if guess_mode:
    return
  # Unlike SparseCtrl the noisy latents are used; the control images too; the scale is linear.
  again, _ = RUN({"params": tree}, sample * 3, t, ctx, cond, 0.7)
  assert rel_err(again[3], got_down[3]) > 1e-3
  other, _ = RUN({"params": tree}, sample, t, ctx, cond[:, ::-1], 0.7)
  assert rel_err(other[3], got_down[3]) > 1e-3
  half, hmid = RUN({"params": tree}, sample, t, ctx, cond, 0.35)
  np.testing.assert_allclose(np.asarray(hmid) * 2, np.asarray(got_mid), rtol=1e-5, atol=1e-6)
  # The residuals have exactly the structure UNet3D takes (its own check, nothing compiled).
  UNet3D(UNET).check_residuals(sample, got_down, got_mid)


def test_global_pool_and_bgr_match_diffusers():
  """control_v11e_sd15_shuffle's global pooling (guess-mode weights then skipped, as diffusers),
  and a BGR channel order; on a one-level ControlNet (a cheap compile)."""
  ref = tiny_controlnet(1, global_pool_conditions=True, controlnet_conditioning_channel_order="bgr",
                        block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                        layers_per_block=1)
  tree, cfg, unet = tree_from_state_dict(ref.state_dict(), diffusers_cfg=dict(ref.config))
  assert cfg.global_pool_conditions and cfg.conditioning_channel_order == "bgr"
  sample, t, ctx, cond = inputs(1)
  want_down, want_mid = run_torch(ref, sample, t, ctx, cond, 0.9, guess_mode=True)
  got_down, got_mid = jax.jit(ControlNet(cfg, unet).apply)({"params": tree}, sample, t, ctx, cond, 0.9, True)
  for g, w in zip(got_down + [got_mid], want_down + [want_mid]):
    assert g.shape[:2] == w.shape[:2] and w.shape[2:4] == (1, 1)   # diffusers keeps (1, 1)
    assert rel_err(g, np.broadcast_to(w, g.shape)) < 1e-4          # ours broadcasts to the skip's shape
  UNet3D(unet).check_residuals(sample, got_down, got_mid)


def test_init_from_unet_adds_nothing_and_params():
  unet_params = random_params(CFG, UNET, seed=5)   # any tree with the UNet's image layers
  unet_params = {k: v for k, v in unet_params.items() if not k.startswith("controlnet_")}
  fresh = init_from_unet(CFG, UNET, unet_params, seed=2)
  f = flatten(fresh)
  assert np.array_equal(f["down_blocks_1/resnets_0/conv1/kernel"],
                        flatten(unet_params)["down_blocks_1/resnets_0/conv1/kernel"])
  assert not np.any(f["controlnet_mid_block/kernel"]) and not np.any(f["controlnet_down_blocks_5/kernel"])
  assert not np.any(f["controlnet_cond_embedding/conv_out/kernel"])
  assert np.any(f["controlnet_cond_embedding/conv_in/kernel"])
  sample, t, ctx, cond = inputs()
  down, mid = RUN({"params": fresh}, sample, t, ctx, cond, 1.0)
  assert all(not np.any(np.asarray(d)) for d in down) and not np.any(np.asarray(mid))
  check_params(CFG, UNET, fresh)
  bad = dict(fresh, controlnet_mid_block={"kernel": np.zeros((1, 1, 64, 32)), "bias": np.zeros(32)})
  with pytest.raises(InputError, match="misshapen"):
    check_params(CFG, UNET, bad)
  with pytest.raises(InputError, match="not the UNet"):
    init_from_unet(CFG, UNET, {"conv_in": unet_params["conv_in"]})
  np.testing.assert_allclose(guess_mode_scales(12), torch.logspace(-1, 0, 13).numpy(), rtol=1e-6)


def test_bad_inputs_before_compiling():
  model = ControlNet(CFG, UNET)
  args = dict(sample=(B, F, S, S, 4), t=(B,), ctx=(B, 7, 32), cond=(B, F, 8 * S, 8 * S, 3))
  for bad, match in ((dict(cond=(B, F, 4 * S, 4 * S, 3)), "8x the latent size"),
                     (dict(cond=(B, F + 1, 8 * S, 8 * S, 3)), "one control image per frame"),
                     (dict(cond=(B, F, 8 * S, 8 * S, 1)), "condition must be"),
                     (dict(ctx=(B, 7, 16)), "text context"), (dict(ctx=(B, F + 1, 7, 32)), "text context"),
                     (dict(t=(B, F + 1)), "timesteps"), (dict(sample=(B, F, 5, 5, 4), cond=(B, F, 40, 40, 3)),
                                                         "divisible")):
    shapes = {**args, **bad}
    with pytest.raises(InputError, match=match):
      jax.eval_shape(model.init, jax.random.key(0), *[jax.ShapeDtypeStruct(shapes[n], jnp.float32)
                                                      for n in ("sample", "t", "ctx", "cond")])
  with pytest.raises(InputError, match="SDXL"):
    jax.eval_shape(ControlNet(CFG, UNetConfig.sdxl()).init, jax.random.key(0),
                   *[jax.ShapeDtypeStruct(s, jnp.float32) for s in
                     ((1, 1, 8, 8, 4), (1,), (1, 7, 2048), (1, 1, 64, 64, 3))])
  with pytest.raises(InputError, match="bgr"):
    ControlNetConfig(conditioning_channel_order="brg")
  with pytest.raises(InputError, match="does not fit"):
    check_compatible(UNET, UNetConfig.tiny(cross_attention_dim=16))


# ------------------------------------------------------------------------------ converters

# Key names of the published files (control_v11p_sd15_canny.pth), each one a different rule.
REAL_LDM_KEYS = ("time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
                 "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.emb_layers.1.weight",
                 "input_blocks.1.1.proj_in.weight", "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
                 "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
                 "middle_block.0.out_layers.3.weight", "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
                 "middle_block.2.in_layers.2.bias", "input_hint_block.0.weight", "input_hint_block.2.weight",
                 "input_hint_block.12.bias", "input_hint_block.14.weight", "zero_convs.0.0.weight",
                 "zero_convs.5.0.bias", "middle_block_out.0.weight")


def same(a: dict, b: dict, bits=False) -> bool:
  if a.keys() != b.keys():
    return False
  raw = lambda x: np.ascontiguousarray(x).view(np.uint8)
  eq = (lambda x, y: x.dtype == y.dtype and np.array_equal(raw(x), raw(y))) if bits else np.array_equal
  return all(np.shape(a[k]) == np.shape(b[k]) and eq(a[k], b[k]) for k in a)


def test_ldm_files_with_and_without_prefix(tmp_path):
  ref = tiny_controlnet(3)
  dsd = to_numpy_sd(ref)
  tree, cfg, unet = tree_from_state_dict(ref.state_dict(), diffusers_cfg=dict(ref.config))
  ldm_sd = controlnet_state_dict(tree, "ldm")
  assert all("control_model." + k in ldm_sd for k in REAL_LDM_KEYS), sorted(ldm_sd)[:8]
  # diffusers' own single-file converter reads our LDM names back into its exact state dict.
  back = convert_controlnet_checkpoint({k: torch.from_numpy(v) for k, v in ldm_sd.items()},
                                       {"layers_per_block": 2})
  assert same({k: v.numpy() for k, v in back.items()}, dsd)

  # v1.1 .pth (control_model.), fp16 .safetensors without prefix, bf16 .safetensors: bit-exact.
  cases = (("control_v11p_sd15_canny.pth", "control_model.", np.float32),
           ("control_v11p_sd15_canny_fp16.safetensors", "", np.float16),
           ("canny_bf16.safetensors", "control_model.", ml_dtypes.bfloat16))
  for name, prefix, dt in cases:
    path = str(tmp_path / name)
    sd = {prefix + k[len("control_model."):]: v.astype(dt) for k, v in ldm_sd.items()}
    io.save_torch_file(sd, path)                   # .pth: torch.save, as lllyasviel's files
    assert detect_keys(sd) == "controlnet_ldm"
    info = {}
    t2, c2, u2 = load_controlnet(path, unet=UNET, info=info)
    assert info["format"] == "ldm" and info["prefix"] == prefix and c2 == cfg and u2 == UNET
    assert same(controlnet_state_dict(t2, "ldm", prefix), sd, bits=True), name
    if dt == np.float32:
      assert same(flatten(t2), flatten(tree))
    text = inspect(path)
    assert "format: controlnet_ldm" in text and "model: SD1.5 ControlNet" in text, text
    assert "conversion check: ok" in text, text


def test_v10_full_file_and_shuffle_name(tmp_path):
  """control_sd15_*.pth hold the ControlNet beside a whole SD1.5 model: only control_model.* is
  read (not an SD checkpoint); a shuffle file by its name gets global pooling."""
  ref = tiny_controlnet(4)
  tree, cfg, _ = tree_from_state_dict(ref.state_dict(), diffusers_cfg=dict(ref.config))
  sd = controlnet_state_dict(tree, "ldm")
  sd.update({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((32, 4, 3, 3), np.float32),
             "first_stage_model.encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32),
             "betas": np.zeros(10, np.float32)})
  assert detect_keys(sd) == "controlnet_ldm"
  path = str(tmp_path / "control_sd15_shuffle.pth")
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  info = {}
  t2, c2, _ = load_controlnet(path, unet=UNET, info=info)
  assert same(flatten(t2), flatten(tree))
  assert c2.global_pool_conditions and any("shuffle" in n for n in info["notes"])
  assert any("ignored 3 tensors" in n for n in info["notes"]), info["notes"]
  text = inspect(path)
  assert "v1.0 full file" in text and "conversion check: ok" in text, text
  # A yaml beside the file decides instead of the name.
  (tmp_path / "control_sd15_shuffle.yaml").write_text(
      "model:\n  params:\n    control_stage_config:\n      params:\n        global_average_pooling: False\n")
  _, c3, _ = load_controlnet(path, unet=UNET)
  assert not c3.global_pool_conditions


def test_diffusers_folder_and_file_round_trip(tmp_path):
  ref = tiny_controlnet(5, global_pool_conditions=True)
  dsd = to_numpy_sd(ref)
  info = {}
  tree, cfg, unet = tree_from_state_dict(ref.state_dict(), diffusers_cfg=dict(ref.config), info=info)
  assert info["format"] == "diffusers" and same(controlnet_state_dict(tree), dsd, bits=True)
  out = str(tmp_path / "controlnet_diffusers")
  export_controlnet(tree, cfg, unet, out, "diffusers")
  loaded = ControlNetModel.from_pretrained(out)          # strict: no missing / unexpected keys
  assert loaded.config.global_pool_conditions and same(to_numpy_sd(loaded), dsd)
  t2, c2, u2 = load_controlnet(out)
  assert c2 == cfg and u2 == unet and same(flatten(t2), flatten(tree))
  # A pipeline folder's controlnet/; a bare diffusers weights file (config from the base UNet).
  pipe = tmp_path / "pipe"
  pipe.mkdir()
  os.rename(out, pipe / "controlnet")
  assert load_controlnet(str(pipe))[1] == cfg
  bare = str(tmp_path / "diffusion_pytorch_model.safetensors")
  io.save_torch_file({k: v.astype(np.float16) for k, v in dsd.items()}, bare)
  assert detect_keys(io.load_torch_file(bare)) == "controlnet_diffusers"
  t3, c3, u3 = load_controlnet(bare, unet=UNET)
  assert u3 == UNET and not c3.global_pool_conditions   # a bare file cannot tell
  assert same(controlnet_state_dict(t3), {k: v.astype(np.float16) for k, v in dsd.items()}, bits=True)
  assert "model: SD1.5 ControlNet (diffusers names)" in inspect(bare)
  # ... and an LDM export of it.
  ldm_path = str(tmp_path / "exported.safetensors")
  export_controlnet(t3, c3, u3, ldm_path, "ldm", prefix="")
  t4, c4, _ = load_controlnet(ldm_path, unet=UNET)
  assert c4 == c3 and same(flatten(t4), flatten(t3), bits=True)


def test_refused_files_name_what_they_are(tmp_path):
  z = lambda *s: np.zeros(s, np.float32)
  def write(name, sd):
    p = str(tmp_path / name)
    io.save_torch_file(sd, p)
    return p
  sparse = write("v3_sd15_sparsectrl_rgb.safetensors", {
      "controlnet_cond_embedding.weight": z(320, 5, 3, 3), "controlnet_down_blocks.0.weight": z(320, 320, 1, 1),
      "down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": z(320, 320)})
  assert detect_keys(io.load_torch_file(sparse)) == "sparse_ctrl_original"
  with pytest.raises(InputError, match=r"v3_sd15_sparsectrl_rgb.*SparseCtrl"):
    load_controlnet(sparse)
  mm = write("mm.safetensors", {"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": z(4, 4)})
  with pytest.raises(InputError, match=r"mm.safetensors.*motion module"):
    load_controlnet(mm)
  sd_ckpt = write("sd.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": z(4, 4, 3, 3)})
  assert detect_keys(io.load_torch_file(sd_ckpt)) == "ldm"
  with pytest.raises(InputError, match="without ControlNet weights"):
    load_controlnet(sd_ckpt)
  # SDXL, both namings.
  ref = tiny_controlnet(6)
  dsd = to_numpy_sd(ref)
  xl = write("controlnet_xl.safetensors", {**dsd, "add_embedding.linear_1.weight": z(128, 64)})
  with pytest.raises(InputError, match=r"controlnet_xl.safetensors.*SDXL"):
    load_controlnet(xl)
  tree, _, _ = tree_from_state_dict(ref.state_dict(), diffusers_cfg=dict(ref.config))
  xl_ldm = write("xl_ldm.safetensors", {**controlnet_state_dict(tree, "ldm"), "control_model.label_emb.0.0.weight": z(8, 8)})
  with pytest.raises(InputError, match="SDXL"):
    load_controlnet(xl_ldm)
  assert "SDXL ControlNet (not supported" in inspect(xl_ldm)
  with pytest.raises(InputError, match="Control-LoRA"):
    load_controlnet(write("control-lora.safetensors", {**controlnet_state_dict(tree, "ldm"), "lora_controlnet": z(1)}))
  folder = tmp_path / "xl_folder"
  folder.mkdir()
  io.save_torch_file(dsd, str(folder / "diffusion_pytorch_model.safetensors"))
  (folder / "config.json").write_text(json.dumps({**dict(ref.config), "_class_name": "ControlNetModel",
                                                  "addition_embed_type": "text_time"}))
  with pytest.raises(InputError, match="SDXL"):
    load_controlnet(str(folder))
  # Corrupt / truncated files, a ControlNet that does not fit the base UNet, missing keys.
  trunc = str(tmp_path / "control_v11p_sd15_canny.pth")
  torch.save({k: torch.from_numpy(v) for k, v in controlnet_state_dict(tree, "ldm").items()}, trunc)
  data = open(trunc, "rb").read()
  open(trunc, "wb").write(data[: len(data) // 2])
  with pytest.raises(InputError, match=r"control_v11p_sd15_canny.pth.*corrupt"):
    load_controlnet(trunc)
  bad = str(tmp_path / "bad.safetensors")
  open(bad, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
  with pytest.raises(InputError, match="bad.safetensors"):
    load_controlnet(bad)
  good = write("good.safetensors", controlnet_state_dict(tree, "ldm"))
  with pytest.raises(InputError, match=r"good.safetensors.*does not fit.*cross_attention_dim"):
    load_controlnet(good, unet=UNetConfig.tiny(cross_attention_dim=16))
  partial = {k: v for k, v in controlnet_state_dict(tree, "ldm").items() if "zero_convs.5." not in k}
  with pytest.raises(InputError, match=r"part.safetensors.*missing keys: controlnet_down_blocks.5"):
    load_controlnet(write("part.safetensors", partial), unet=UNET)


# ------------------------------------------------------------------------------ full size


@pytest.mark.slow
def test_full_size_sd15_controlnet():
  """SD1.5: parameter count and key table at full size (no weights: shapes and per-key markers),
  diffusers' converter reads our LDM names, and one small forward against diffusers."""
  cfg, unet = ControlNetConfig.sd15(), UNetConfig.sd15()
  with torch.device("meta"):
    meta = ControlNetModel(cross_attention_dim=768)
  shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
  ours = flatten(param_shapes(cfg, unet))
  assert sum(int(np.prod(v.shape)) for v in ours.values()) == sum(int(np.prod(s)) for s in shapes.values())
  # One distinct constant per key (broadcast views: no memory), through diffusers -> LDM -> ours.
  marks = {k: np.broadcast_to(np.float16(i), s) for i, (k, s) in enumerate(sorted(shapes.items()))}
  tree, c2, u2 = tree_from_state_dict(marks, "full-size diffusers names", diffusers_cfg=dict(meta.config))
  assert c2 == cfg and u2 == unet
  ldm_sd = controlnet_state_dict(tree, "ldm")
  assert len(ldm_sd) == len(shapes) and ldm_sd["control_model.input_hint_block.14.weight"].shape == (320, 256, 3, 3)
  assert ldm_sd["control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
  assert ldm_sd["control_model.zero_convs.11.0.weight"].shape == (1280, 1280, 1, 1)
  assert all("control_model." + k in ldm_sd for k in REAL_LDM_KEYS)
  back = convert_controlnet_checkpoint(dict(ldm_sd), {"layers_per_block": 2})
  assert back.keys() == marks.keys() and all(np.array_equal(back[k], marks[k]) for k in marks)
  t3, c3, u3 = tree_from_state_dict(ldm_sd, "full-size LDM names")
  assert c3 == cfg and u3 == unet and same(flatten(t3), flatten(tree))
  del meta, marks, tree, t3, back, ldm_sd

  from torch_ref import randomize_
  ref = randomize_(ControlNetModel(cross_attention_dim=768), 0).eval()
  params, _, _ = tree_from_state_dict(ref.state_dict(), diffusers_cfg=dict(ref.config))
  b, f, s = 1, 2, 8
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((b, f, s, s, 4)).astype(np.float32)
  t = np.array([421.0], np.float32)
  ctx = rng.standard_normal((b, 77, 768)).astype(np.float32)
  cond = rng.random((b, f, 8 * s, 8 * s, 3)).astype(np.float32)
  fr = lambda a: torch.from_numpy(a.reshape(b * f, *a.shape[2:])).permute(0, 3, 1, 2)
  with torch.no_grad():
    down, mid = ref(fr(sample), torch.from_numpy(np.repeat(t, f)), torch.from_numpy(np.repeat(ctx, f, axis=0)),
                    fr(cond), return_dict=False)
  want = [x.permute(0, 2, 3, 1).numpy().reshape(b, f, x.shape[2], x.shape[3], x.shape[1]) for x in (*down, mid)]
  del ref
  got_down, got_mid = jax.jit(ControlNet(cfg, unet).apply)({"params": params}, sample, t, ctx, cond)
  err = max(rel_err(g, w) for g, w in zip([*got_down, got_mid], want))
  print(f"SD1.5 ControlNet, 2 frames 8x8: max rel err {err:.2e}")
  assert err < 1e-4
