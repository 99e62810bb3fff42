"""Weight converters: PyTorch checkpoints (LDM, diffusers, AnimateDiff formats) <-> Orbax.

Every checkpoint here is made by the test with the real key names from randomly initialised
diffusers / transformers models; the LDM key set is validated independently by diffusers' own
single-file conversion functions.
"""
import json
import os
import pickle
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as TorchVAE, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.numpy import save_file as np_save_safetensors

from adiff_jax.clip_text import CLIPTextConfig, CLIPTextModel
from adiff_jax.motion_module import MotionModuleConfig
from adiff_jax.unet import UNet3D, UNetConfig
from adiff_jax.vae import AutoencoderKL, VAEConfig
from adiff_jax import model_dir
from adiff_jax.model import param_shapes
from convert_weights import convert as pipeline, io, ldm, lora_files, motion_module_files as motion, sd_base as base
from convert_weights.errors import ConversionError
from convert_weights.motion_module_keys import diffusers_to_official
from adiff_jax.motion_module import merge_motion_module, split_motion_module
from adiff_jax.params import flatten
from convert_weights.tree import path_to_torch_key, tree_to_state_dict
from torch_ref import patch_motion_norms_per_frame, randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=2,
                 cross_attention_dim=32, norm_num_groups=8, sample_size=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                 bos_token_id=0, eos_token_id=999, pad_token_id=999)
# What the weights cannot tell (SD1.5 defaults are 8 heads, 32 groups, hidden/64 heads).
OVERRIDES = {"unet": {"attention_heads": 2, "norm_num_groups": 8}, "vae": {"norm_num_groups": 8},
             "text_encoder": {"num_heads": 4}}
MM_OV = {"motion_module": {"num_heads": 2, "norm_groups": 8}}


def np_sd(module):
  return {k: io.tensor_to_numpy(v) for k, v in module.state_dict().items()}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(1e-12, np.abs(b).max())


def assert_same_file(a: str, b: str):
  """Bit-exact: same keys, dtypes, shapes and bytes."""
  sa, sb = io.load_torch_file(a), io.load_torch_file(b)
  assert sorted(sa) == sorted(sb), (set(sa) ^ set(sb))
  for k in sa:
    assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
    assert sa[k].tobytes() == sb[k].tobytes(), k


# ---------------------------------------------------------------- torch models and files
@pytest.fixture(scope="module")
def torch_models():
  torch.manual_seed(0)
  unet = randomize_(UNet2DConditionModel(**TINY_UNET), 1).eval()
  vae = randomize_(TorchVAE(**TINY_VAE), 2).eval()
  clip = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_CLIP)), 3).eval()
  return unet, vae, clip


def ldm_state_dict(torch_models, dtype=None):
  unet, vae, clip = torch_models
  sd = ldm.join_ldm(np_sd(unet), np_sd(vae), {"text_model." + k: v for k, v in np_sd(clip).items()})
  sd[ldm.CLIP_PREFIX + "text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  sd["alphas_cumprod"] = np.linspace(1, 0.01, 1000).astype(np.float32)
  if dtype is not None:
    sd = {k: (v.astype(dtype) if v.dtype == np.float32 and k != "alphas_cumprod" else v) for k, v in sd.items()}
  return sd


@pytest.fixture(scope="module")
def ldm_file(torch_models, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ldm") / "tiny.safetensors")
  io.save_torch_file(ldm_state_dict(torch_models), path)
  return path


@pytest.fixture(scope="module")
def base_model(ldm_file):
  return base.load_base_model(ldm_file, overrides=OVERRIDES)


def tiny_adapter(mid=True, max_len=32, seed=4):
  a = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2,
                    motion_mid_block_layers_per_block=1, motion_num_attention_heads=2,
                    motion_norm_num_groups=8, use_motion_mid_block=mid, motion_max_seq_length=max_len)
  return randomize_(a, seed).eval()


def official_sd(adapter, with_pe=True):
  """The original-format state dict of a MotionAdapter: official names, pe per attention block."""
  out = {}
  for k, v in np_sd(adapter).items():
    if k.endswith("pos_embed.pe"):
      if with_pe:
        for i in (0, 1):
          out[diffusers_to_official(k.replace("pos_embed.pe", f"attn{i + 1}.pos_encoder.pe"))] = v
    else:
      out[diffusers_to_official(k)] = v
  return out


# ---------------------------------------------------------------- LDM tables
def test_ldm_export_loads_in_diffusers_single_file_converters(base_model, torch_models, tmp_path):
  """Our LDM writer, checked by diffusers' own LDM -> diffusers conversion (independent table)."""
  unet, vae, clip = torch_models
  out = str(tmp_path / "exported.safetensors")
  base.export_ldm(out, base_model["unet"], base_model["vae"], base_model["text_encoder"])
  ckpt = {k: io.numpy_to_tensor(v) for k, v in io.load_torch_file(out).items()}
  n_unet = sum(k.startswith(ldm.UNET_PREFIX) for k in ckpt)
  for name, converted, ref, n in (
      ("unet", sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), unet, n_unet),
      ("vae", sfu.convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), vae,
       sum(k.startswith(ldm.VAE_PREFIX) for k in ckpt)),
      ("clip", sfu.convert_ldm_clip_checkpoint(ckpt), clip,
       sum(k.startswith(ldm.CLIP_PREFIX) for k in ckpt))):
    if name == "clip":  # transformers v5 CLIPTextModel has no text_model. prefix
      converted = {k[len("text_model."):]: v for k, v in converted.items()}
    assert len(converted) == n, name  # every LDM key consumed once
    fresh = (transformers.CLIPTextModel(ref.config) if name == "clip" else type(ref).from_config(ref.config))
    missing, unexpected = fresh.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (name, missing, unexpected)
    want = ref.state_dict()
    for k, v in converted.items():
      assert torch.equal(v, want[k]), (name, k)


def test_ldm_tables_invert():
  keys = ["input_blocks.4.1.proj_in.weight", "input_blocks.3.0.op.weight", "middle_block.2.emb_layers.1.bias",
          "output_blocks.5.2.conv.weight", "output_blocks.2.1.conv.bias", "out.2.weight", "time_embed.2.bias"]
  d = [ldm.unet_key_ldm_to_diffusers(k, 2) for k in keys]
  assert d[:3] == ["down_blocks.1.attentions.0.proj_in.weight", "down_blocks.0.downsamplers.0.conv.weight",
                   "mid_block.resnets.1.time_emb_proj.bias"]
  assert d[3:5] == ["up_blocks.1.upsamplers.0.conv.weight", "up_blocks.0.upsamplers.0.conv.bias"]
  back = [ldm.unet_key_diffusers_to_ldm(k, 2, {1}) for k in d]
  assert back == keys


# ---------------------------------------------------------------- parity of converted weights
def test_base_parity_unet_clip_vae(base_model, torch_models):
  unet, vae, clip = torch_models
  rng = np.random.default_rng(0)
  # UNet: our video UNet without motion = the image UNet per frame.
  sample = rng.standard_normal((1, 2, 8, 8, 4)).astype(np.float32)
  t = np.array([321.0], np.float32)
  ctx = rng.standard_normal((1, 7, 32)).astype(np.float32)
  with torch.no_grad():
    x = torch.from_numpy(sample).reshape(2, 8, 8, 4).permute(0, 3, 1, 2)
    want = unet(x, torch.tensor([321.0, 321.0]), torch.from_numpy(np.repeat(ctx, 2, 0))).sample
  want = want.permute(0, 2, 3, 1).reshape(1, 2, 8, 8, 4).numpy()
  got = jax.jit(UNet3D(base_model["unet_config"]).apply)({"params": base_model["unet"]}, sample, t, ctx)
  assert rel_err(got, want) < 1e-4
  # CLIP: last_hidden_state.
  ids = rng.integers(0, 1000, (2, 77)).astype(np.int32)
  with torch.no_grad():
    want = clip(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  got = jax.jit(CLIPTextModel(base_model["text_config"]).apply)({"params": base_model["text_encoder"]}, ids)
  assert rel_err(got, want) < 1e-4
  # VAE decode.
  z = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
  with torch.no_grad():
    want = vae.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  got = AutoencoderKL(base_model["vae_config"]).apply({"params": base_model["vae"]}, z,
                                                      method=AutoencoderKL.decode)
  assert rel_err(got, want) < 1e-4


def test_diffusers_folder_equals_ldm_file(base_model, torch_models, tmp_path):
  unet, vae, clip = torch_models
  for name, m in (("unet", unet), ("vae", vae), ("text_encoder", clip)):
    m.save_pretrained(str(tmp_path / name))
  b = base.load_base_model(str(tmp_path), overrides=OVERRIDES)
  assert b["format"] == "diffusers"
  assert b["unet_config"] == base_model["unet_config"]
  for part in ("unet", "vae", "text_encoder"):
    fa, fb = flatten(b[part]), flatten(base_model[part])
    assert sorted(fa) == sorted(fb)
    assert all(np.array_equal(fa[k], fb[k]) for k in fa), part


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype,ext", [(None, ".safetensors"), (np.float16, ".ckpt"),
                                       (ml_dtypes.bfloat16, ".safetensors")])
def test_ldm_round_trip_bit_exact(torch_models, tmp_path, dtype, ext):
  src = str(tmp_path / f"src{ext}")
  sd = ldm_state_dict(torch_models, dtype)
  sd["model_ema.decay"] = np.array(0.999, np.float32)  # EMA keys are dropped with a note
  io.save_torch_file(sd, src)
  meta = pipeline.to_orbax(str(tmp_path / "orbax"), base_path=src, overrides=OVERRIDES, log=lambda s: None)
  assert any("EMA" in n for n in meta["notes"])
  out = str(tmp_path / f"back{ext}")
  pipeline.to_torch(str(tmp_path / "orbax"), "ldm", out, log=lambda s: None)
  sd.pop("model_ema.decay")
  io.save_torch_file(sd, src)
  assert_same_file(src, out)
  trees, meta = model_dir.load_items(str(tmp_path / "orbax"), ["unet"])
  assert model_dir.config_of(meta, "unet") == UNetConfig.tiny()
  assert meta["sources"]["base"]["sha256"] and meta["converter_version"]


@pytest.fixture(scope="module")
def adapter_v2():
  return tiny_adapter(mid=True, max_len=32)


@pytest.mark.parametrize("kind", ["original_pe", "original_no_pe", "diffusers_folder", "train_py"])
def test_motion_module_round_trip(adapter_v2, torch_models, tmp_path, kind):
  sd = official_sd(adapter_v2, with_pe=kind != "original_no_pe")
  if kind == "diffusers_folder":
    src = str(tmp_path / "adapter")
    adapter_v2.save_pretrained(src)
  elif kind == "train_py":  # the whole UNet, with a module. prefix (DDP) and a state_dict wrapper
    src = str(tmp_path / "train.ckpt")
    whole = {**{k: io.numpy_to_tensor(v) for k, v in sd.items()},
             **{k: v for k, v in torch_models[0].state_dict().items()}}
    torch.save({"state_dict": {"module." + k: v for k, v in whole.items()}, "global_step": 10}, src)
  else:
    src = str(tmp_path / ("mm.ckpt" if kind == "original_pe" else "mm.safetensors"))
    io.save_torch_file(sd, src)
  info = {}
  tree, cfg, version = motion.load_motion_module(src, num_heads=2, norm_groups=8, info=info)
  assert version == "v2" and cfg.max_len == 32 and cfg.mid_block and cfg.resolutions == (1, 2)
  out_dir = str(tmp_path / "orbax")
  pipeline.to_orbax(out_dir, motion_module=src, overrides=MM_OV, log=lambda s: None)
  if kind == "diffusers_folder":
    back = str(tmp_path / "back_adapter")
    pipeline.to_torch(out_dir, "motion_module", back, fmt="diffusers", log=lambda s: None)
    assert_same_file(os.path.join(src, "diffusion_pytorch_model.safetensors"),
                     os.path.join(back, "diffusion_pytorch_model.safetensors"))
  else:
    back = str(tmp_path / "back.safetensors")
    pipeline.to_torch(out_dir, "motion_module", back, log=lambda s: None)
    want = str(tmp_path / "want.safetensors")
    io.save_torch_file(sd, want)  # train.py: only the motion-module tensors come back
    assert_same_file(want, back)


def test_exported_motion_adapter_loads_in_diffusers(adapter_v2, tmp_path):
  src = str(tmp_path / "mm.safetensors")
  io.save_torch_file(official_sd(adapter_v2, with_pe=False), src)
  tree, cfg, _ = motion.load_motion_module(src, num_heads=2, norm_groups=8)
  out = str(tmp_path / "adapter")
  motion.export_motion_module(tree, cfg, out, fmt="diffusers")
  loaded, info = MotionAdapter.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  want = adapter_v2.state_dict()
  for k, v in loaded.state_dict().items():
    assert torch.equal(v, want[k]), k


@pytest.mark.parametrize("mid,max_len,want_version", [(False, 24, "v1"), (False, 32, "v3")])
def test_motion_module_versions_and_parity(torch_models, base_model, tmp_path, mid, max_len, want_version):
  """Converted base + motion module reproduce diffusers' UNetMotionModel (per-frame motion norm)."""
  adapter = tiny_adapter(mid=mid, max_len=max_len, seed=7)
  src = str(tmp_path / "mm.ckpt")
  io.save_torch_file(official_sd(adapter), src)
  tree, cfg, version = motion.load_motion_module(src, num_heads=2, norm_groups=8)
  assert version == want_version and cfg.max_len == max_len
  if want_version == "v1":
    return  # v1's base-UNet GroupNorm differs from diffusers; parity below covers the mapping
  ref = UNetMotionModel.from_unet2d(torch_models[0], adapter).eval()
  patch_motion_norms_per_frame(ref, 4)
  rng = np.random.default_rng(1)
  sample = rng.standard_normal((1, 4, 8, 8, 4)).astype(np.float32)
  ctx = rng.standard_normal((1, 7, 32)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(sample).permute(0, 4, 1, 2, 3), torch.tensor([77.0]),
               torch.from_numpy(np.repeat(ctx, 4, 0))).sample.permute(0, 2, 3, 4, 1).numpy()
  params = merge_motion_module(base_model["unet"], tree)
  got = jax.jit(UNet3D(base_model["unet_config"], cfg).apply)({"params": params}, sample, np.array([77.0]), ctx)
  assert rel_err(got, want) < 1e-4


def test_missing_pe_version_rules():
  notes = []
  assert motion.detect_version(False, None, None, notes) == ("v3", 32) and notes
  assert motion.detect_version(True, None, None, []) == ("v2", 32)
  assert motion.detect_version(False, None, 24, []) == ("v1", 24)
  assert motion.detect_version(False, 24, None, []) == ("v1", 24)


# ---------------------------------------------------------------- LoRA files
def processor_lora_sd(params, where, rank, seed, dtype=np.float32):
  rng = np.random.default_rng(seed)
  sd = {}
  for p, v in flatten(params).items():
    parts = p.split("/")
    if parts[-1] != "kernel" or parts[-2] not in ("to_q", "to_k", "to_v", "to_out_0") or not where(p):
      continue
    layer = path_to_torch_key(tuple(parts))[:-len(".weight")]
    mod, proj = (layer[:-len(".to_out.0")], "to_out") if layer.endswith("to_out.0") else layer.rsplit(".", 1)
    d_in, d_out = v.shape
    sd[f"{mod}.processor.{proj}_lora.down.weight"] = rng.standard_normal((rank, d_in)).astype(dtype)
    sd[f"{mod}.processor.{proj}_lora.up.weight"] = rng.standard_normal((d_out, rank)).astype(dtype)
  return sd


@pytest.mark.parametrize("kind", ["motion_lora", "domain_adapter"])
def test_processor_lora_round_trip_and_merge(kind, base_model, adapter_v2, tmp_path):
  from adiff_jax import lora as L
  mm_tree, _, _ = motion.load_motion_module(_mm_file(adapter_v2, tmp_path), num_heads=2, norm_groups=8)
  params = mm_tree if kind == "motion_lora" else base_model["unet"]
  where = L.motion_lora_filter if kind == "motion_lora" else L.domain_adapter_filter
  sd = processor_lora_sd(params, where, rank=3, seed=5, dtype=np.float16)
  src = str(tmp_path / f"{kind}.ckpt")
  io.save_torch_file(sd, src)
  out_dir = str(tmp_path / "orbax")
  arg = {"motion_loras": [(src, 0.7)]} if kind == "motion_lora" else {"domain_adapter": (src, 0.7)}
  pipeline.to_orbax(out_dir, log=lambda s: None, **arg)
  back = str(tmp_path / "back.ckpt")
  pipeline.to_torch(out_dir, kind, back, log=lambda s: None)
  assert_same_file(src, back)
  # Semantics: merging the LoRA equals W += alpha * up @ down on the torch weight.
  loader = lora_files.load_motion_lora if kind == "motion_lora" else lora_files.load_domain_adapter
  lora = loader(src, 0.7)
  merged = flatten(L.merge_lora(params, lora))
  key = next(k for k in sd if "to_out_lora.down" in k)
  layer = key.replace(".processor.to_out_lora.down.weight", ".to_out.0")
  w = tree_to_state_dict({"x": {"kernel": flatten(params)[_path(layer)]}})["x.weight"]
  want = w + 0.7 * sd[key.replace(".down.", ".up.")].astype(np.float32) @ sd[key].astype(np.float32)
  got = tree_to_state_dict({"x": {"kernel": merged[_path(layer)]}})["x.weight"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _path(torch_layer: str) -> str:
  from convert_weights.tree import torch_key_to_path
  return "/".join(torch_key_to_path(torch_layer + ".weight", 2))


def _mm_file(adapter, tmp_path):
  p = str(tmp_path / "mm_for_lora.safetensors")
  io.save_torch_file(official_sd(adapter), p)
  return p


@pytest.mark.parametrize("kohya_scaling", [False, True])
def test_kohya_lora_merge(base_model, tmp_path, kohya_scaling):
  rng = np.random.default_rng(2)
  r = 4
  layers = {  # kohya name -> (torch weight key in our trees' naming, shape of the target weight)
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
      "lora_unet_up_blocks_1_attentions_2_proj_in": ("unet", "up_blocks.1.attentions.2.proj_in"),  # 1x1 conv
      "lora_unet_down_blocks_0_resnets_1_conv1": ("unet", "down_blocks.0.resnets.1.conv1"),  # 3x3 LoCon
      "lora_te_text_model_encoder_layers_1_self_attn_q_proj": ("text_encoder", "text_model.encoder.layers.1.self_attn.q_proj"),
  }
  sd, wants = {}, {}
  for name, (part, layer) in layers.items():
    w = tree_to_state_dict(base_model[part])[layer + ".weight"]
    down_shape = (r, w.shape[1]) + ((w.shape[2], w.shape[3]) if w.ndim == 4 else ())
    up_shape = (w.shape[0], r) + ((1, 1) if w.ndim == 4 else ())
    down = rng.standard_normal(down_shape).astype(np.float32)
    up = rng.standard_normal(up_shape).astype(np.float32)
    sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
    sd[name + ".alpha"] = np.array(2.0, np.float32)
    scale = 0.8 * (2.0 / r if kohya_scaling else 1.0)
    delta = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(w.shape)
    wants[(part, layer)] = w + scale * delta
  src = str(tmp_path / "kohya.safetensors")
  io.save_torch_file(sd, src)
  unet, text = lora_files.merge_kohya_lora(base_model["unet"], base_model["text_encoder"], src, 0.8,
                                           kohya_scaling)
  for (part, layer), want in wants.items():
    got = tree_to_state_dict(unet if part == "unet" else text)[layer + ".weight"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Untouched layers stay identical.
  a, b = flatten(unet), flatten(base_model["unet"])
  assert np.array_equal(a["conv_in/kernel"], b["conv_in/kernel"])


# ---------------------------------------------------------------- errors
class _Evil:
  def __reduce__(self):
    return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_refused(tmp_path):
  p = str(tmp_path / "evil.ckpt")
  with open(p, "wb") as f:
    pickle.dump({"state_dict": {"x": _Evil()}}, f)
  with pytest.raises(ConversionError, match=r"evil\.ckpt.*refused"):
    io.load_torch_file(p)
  p2 = str(tmp_path / "evil_zip.pt")
  torch.save({"w": torch.zeros(2), "payload": _Evil()}, p2)
  with pytest.raises(ConversionError, match="refused"):
    io.load_torch_file(p2)


def test_unknown_and_unsupported_formats(tmp_path, ldm_file):
  unknown = str(tmp_path / "x.safetensors")
  np_save_safetensors({"foo.bar": np.zeros(3, np.float32)}, unknown)
  with pytest.raises(ConversionError, match="not an LDM.*looks like: unknown"):
    base.load_base_model(unknown)
  with pytest.raises(ConversionError, match="not a motion module: found unknown"):
    motion.load_motion_module(unknown)
  onnx = tmp_path / "model.onnx"
  onnx.write_bytes(b"xx")
  with pytest.raises(ConversionError, match="unknown file type"):
    io.load_torch_file(str(onnx))
  sd2 = str(tmp_path / "sd2.safetensors")
  np_save_safetensors({"model.diffusion_model.out.2.bias": np.zeros(4, np.float32),
                       "cond_stage_model.model.token_embedding.weight": np.zeros((4, 4), np.float32)}, sd2)
  with pytest.raises(ConversionError, match="SD2.x .*not supported yet"):
    base.load_base_model(sd2)
  xl = str(tmp_path / "xl.safetensors")   # SDXL base files convert (test_sdxl_convert.py); the refiner not
  np_save_safetensors({"model.diffusion_model.label_emb.0.0.weight": np.zeros((4, 4), np.float32),
                       "conditioner.embedders.0.model.x": np.zeros(4, np.float32)}, xl)
  with pytest.raises(ConversionError, match="SDXL refiner"):
    base.load_base_model(xl)
  np_save_safetensors({"model.diffusion_model.label_emb.0.0.weight": np.zeros((4, 4), np.float32),
                       "conditioner.embedders.0.transformer.x": np.zeros(4, np.float32)}, xl)
  with pytest.raises(ConversionError, match="no input_blocks"):
    base.load_base_model(xl)


def test_missing_keys_and_shape_mismatch(torch_models, tmp_path):
  sd = ldm_state_dict(torch_models)
  dropped = [k for k in sd if k.startswith(ldm.UNET_PREFIX + "input_blocks.1.1.")]
  for k in dropped:
    del sd[k]
  p = str(tmp_path / "missing.safetensors")
  io.save_torch_file(sd, p)
  with pytest.raises(ConversionError, match=r"missing keys: down_blocks\.0\.attentions\.0\..*in all"):
    base.load_base_model(p, overrides=OVERRIDES)
  sd = ldm_state_dict(torch_models)
  k = ldm.UNET_PREFIX + "out.2.bias"
  sd[k] = np.zeros(5, np.float32)
  sd[ldm.UNET_PREFIX + "extra.weight"] = np.zeros(3, np.float32)
  io.save_torch_file(sd, p)
  with pytest.raises(ConversionError, match=r"unexpected keys: extra\.weight"):
    base.load_base_model(p, overrides=OVERRIDES)
  del sd[ldm.UNET_PREFIX + "extra.weight"]
  io.save_torch_file(sd, p)
  with pytest.raises(ConversionError, match=r"shape mismatch at conv_out\.bias: checkpoint has \[5\], "
                                            r"the model expects \[4\]"):
    base.load_base_model(p, overrides=OVERRIDES)


def test_failed_write_leaves_no_output_dir(ldm_file, tmp_path, monkeypatch):
  calls = []
  real = model_dir._write_item

  def flaky(path, tree):
    calls.append(path)
    if len(calls) == 2:
      raise RuntimeError("disk full (injected)")
    real(path, tree)

  monkeypatch.setattr(model_dir, "_write_item", flaky)
  out = tmp_path / "model"
  with pytest.raises(RuntimeError, match="injected"):
    pipeline.to_orbax(str(out), base_path=ldm_file, overrides=OVERRIDES, log=lambda s: None)
  assert not out.exists()
  assert os.listdir(tmp_path) == []  # no temp dir left either
  monkeypatch.setattr(model_dir, "_write_item", real)
  pipeline.to_orbax(str(out), base_path=ldm_file, overrides=OVERRIDES, log=lambda s: None)
  with pytest.raises(ConversionError, match="already exists"):
    pipeline.to_orbax(str(out), base_path=ldm_file, overrides=OVERRIDES, log=lambda s: None)


# ---------------------------------------------------------------- CLI
def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "convert_weights", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)


def test_cli_inspect_convert_export_and_errors(ldm_file, adapter_v2, tmp_path):
  mm = str(tmp_path / "mm.ckpt")
  io.save_torch_file(official_sd(adapter_v2), mm)
  r = _cli("inspect", mm)
  assert r.returncode == 0, r.stderr
  assert "motion_module_original" in r.stdout and "version v2" in r.stdout and "tensors:" in r.stdout
  out = str(tmp_path / "orbax")
  r = _cli("to-orbax", "--base", ldm_file, "--unet-heads", "2", "--norm-groups", "8", "--text-heads", "4",
           "--motion-module", mm, "--mm-heads", "2", "--mm-norm-groups", "8", "--dtype", "bf16", "--out", out)
  assert r.returncode == 0, r.stderr
  meta = json.load(open(os.path.join(out, "metadata.json")))
  assert meta["versions"]["motion_module"] == "v2" and meta["tensor_dtypes"]["unet"] == ["bfloat16"]
  r = _cli("to-torch", out, "--what", "motion_module", "--format", "diffusers", "--out", str(tmp_path / "ad"))
  assert r.returncode == 0, r.stderr
  assert os.path.isfile(tmp_path / "ad" / "config.json")
  r = _cli("to-orbax", "--base", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o2"))
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1 and "no such file" in errors[0]   # as argparse
  assert "Traceback" not in r.stderr
  assert r.stderr.rstrip().splitlines()[-1] == errors[0]
  assert not (tmp_path / "o2").exists()
  r = _cli("--help")
  assert r.returncode == 0 and "to-orbax" in r.stdout


# ---------------------------------------------------------------- full-size shapes (slow)
def _random_like(tree, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02).astype(dtype), tree)


@pytest.mark.slow
def test_sd15_full_size_ldm_fp16_round_trip(tmp_path):
  """SD1.5-shaped LDM file (random fp16 from our shape tables) converts and round-trips."""
  unet = _random_like(param_shapes(UNetConfig.sd15()), np.float16, 0)
  vae = _random_like(param_shapes(VAEConfig.sd15()), np.float16, 1)
  text = _random_like(param_shapes(CLIPTextConfig.sd15()), np.float16, 2)
  src = str(tmp_path / "sd15.safetensors")
  base.export_ldm(src, unet, vae, text)
  sd = io.load_torch_file(src)
  assert sum(k.startswith(ldm.UNET_PREFIX) for k in sd) == 686
  assert sum(k.startswith(ldm.VAE_PREFIX) for k in sd) == 248
  assert sum(k.startswith(ldm.CLIP_PREFIX) for k in sd) == 196
  out = str(tmp_path / "orbax")
  meta = pipeline.to_orbax(out, base_path=src, log=lambda s: None)
  assert meta["configs"]["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
  back = str(tmp_path / "back.safetensors")
  pipeline.to_torch(out, "ldm", back, log=lambda s: None)
  assert_same_file(src, back)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_full_size_motion_modules(tmp_path, version):
  cfg = MotionModuleConfig.preset(version)
  _, mm = split_motion_module(param_shapes(UNetConfig.sd15(), cfg))
  tree = _random_like(mm, np.float16, 3)
  n = sum(int(np.prod(v.shape)) for v in flatten(tree).values())
  assert n == (453_209_280 if version == "v2" else 417_137_600)
  src = str(tmp_path / "mm.ckpt")
  io.save_torch_file(motion.motion_module_state_dict(tree, cfg, "original", with_pe=True), src)
  got, got_cfg, got_version = motion.load_motion_module(src)
  assert got_version == version and got_cfg == cfg
  out = str(tmp_path / "orbax")
  pipeline.to_orbax(out, motion_module=src, log=lambda s: None)
  back = str(tmp_path / "back.ckpt")
  pipeline.to_torch(out, "motion_module", back, log=lambda s: None)
  assert_same_file(src, back)
