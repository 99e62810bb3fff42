"""SDXL base-model converters: A1111/Civitai single files (LDM UNet with label_emb, CLIP-L under
conditioner.embedders.0.transformer, OpenCLIP bigG under conditioner.embedders.1.model with fused
q/k/v and a transposed text_projection) and diffusers folders, both directions, bit-exact; the
refiner and SD2.x refused. Files are written by the test from random tiny diffusers/transformers
models with the real key names; the exports are read back by diffusers' own single-file code."""
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu

from adiff_jax import model_dir
from adiff_jax.model import ModelConfig
from adiff_jax.params import flatten
from adiff_jax.sdxl_text import sdxl_tokenizers
from convert_weights import convert as pipeline, io, ldm, lora_files, sd_base as base, sdxl_keys
from convert_weights.detect import detect_keys
from convert_weights.errors import ConversionError
from convert_weights.inspect_cmd import inspect
from test_sdxl import TINY_XL
from test_sdxl_text import hf_text_model
from torch_ref import randomize_, tiny_vae

TINY = ModelConfig.tiny_sdxl()
# What the weights cannot tell at these sizes (full size: channels/64 and hidden/64 heads, 32 groups).
OVERRIDES = {"unet": {"attention_heads": (2, 4, 4), "norm_num_groups": 8}, "vae": {"norm_num_groups": 8},
             "text_encoder": {"num_heads": 2}, "text_encoder_2": {"num_heads": 2}}
G = sdxl_keys.CLIP_G_PREFIX
L = sdxl_keys.CLIP_L_PREFIX
quiet = dict(log=lambda s: None)


def np_sd(module, prefix_text_model=False):
  sd = {k: io.tensor_to_numpy(v) for k, v in module.state_dict().items()}
  if prefix_text_model:  # transformers v5 drops the prefix; files on disk (the hub's) have it
    sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}
  return sd


def open_clip_names(te2) -> dict:
  """OpenCLIP's own state dict of a transformers CLIPTextModelWithProjection, written out here
  independently of convert_weights (as open_clip's TextTransformer names its tensors)."""
  sd, out = np_sd(te2, True), {}
  c = te2.config.hidden_size
  out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
  out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
  out["ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
  out["ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
  out["text_projection"] = np.ascontiguousarray(sd["text_projection.weight"].T)   # x @ P
  for i in range(te2.config.num_hidden_layers):
    h, o = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
    for leaf in ("weight", "bias"):
      out[o + f"attn.in_proj_{leaf}"] = np.concatenate([sd[h + f"self_attn.{x}_proj.{leaf}"] for x in "qkv"])
      assert out[o + f"attn.in_proj_{leaf}"].shape[0] == 3 * c
      out[o + f"attn.out_proj.{leaf}"] = sd[h + f"self_attn.out_proj.{leaf}"]
      out[o + f"ln_1.{leaf}"] = sd[h + f"layer_norm1.{leaf}"]
      out[o + f"ln_2.{leaf}"] = sd[h + f"layer_norm2.{leaf}"]
      out[o + f"mlp.c_fc.{leaf}"] = sd[h + f"mlp.fc1.{leaf}"]
      out[o + f"mlp.c_proj.{leaf}"] = sd[h + f"mlp.fc2.{leaf}"]
  out["logit_scale"] = np.array(4.6052, np.float32)
  return out


@pytest.fixture(scope="module")
def models():
  torch.manual_seed(0)
  unet = randomize_(UNet2DConditionModel(**TINY_XL), 11).eval()
  return unet, tiny_vae(12), hf_text_model(TINY.text, 13), hf_text_model(TINY.text_2, 14)


@pytest.fixture(scope="module")
def want(models):
  """Our trees of the torch models (the reference mapping, no converter config logic)."""
  unet, vae, te1, te2 = models
  return {"unet": base.tree_from_diffusers(unet.state_dict(), "unet"),
          "vae": base.tree_from_diffusers(vae.state_dict(), "vae"),
          "text_encoder": base.tree_from_diffusers(te1.state_dict(), "text_encoder"),
          "text_encoder_2": base.tree_from_diffusers(te2.state_dict(), "text_encoder_2")}


def single_file_sd(models) -> dict:
  unet, vae, te1, te2 = models
  sd = ldm.join_ldm(np_sd(unet), np_sd(vae), {})     # UNet/VAE LDM names (checked by diffusers below)
  assert sd[ldm.UNET_PREFIX + "label_emb.0.0.weight"].shape == (128, 64)
  sd.update({L + k: v for k, v in np_sd(te1, True).items()})
  sd[L + "text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  sd.update({G + k: v for k, v in open_clip_names(te2).items()})
  sd["denoiser.sigmas"] = np.linspace(0.03, 14.6, 1000).astype(np.float32)
  return sd


@pytest.fixture(scope="module")
def sdxl_file(models, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sdxl") / "sdxl_tiny.safetensors")
  io.save_torch_file(single_file_sd(models), path)
  return path


def assert_trees_equal(a, b, what):
  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb), (what, set(fa) ^ set(fb))
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), (what, k)


def assert_same_file(a: str, b: str):
  sa, sb = io.load_torch_file(a), io.load_torch_file(b)
  assert sorted(sa) == sorted(sb), set(sa) ^ set(sb)
  for k in sa:
    assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and sa[k].tobytes() == sb[k].tobytes(), k


# ---------------------------------------------------------------- single file
def test_single_file_round_trip_bit_exact_and_read_by_diffusers(sdxl_file, models, want, tmp_path):
  assert detect_keys(io.load_torch_file(sdxl_file)) == "sdxl"
  out = str(tmp_path / "orbax")
  meta = pipeline.to_orbax(out, base_path=sdxl_file, overrides=OVERRIDES, **quiet)
  assert meta["family"] == "sdxl" and meta["formats"]["base"] == "ldm"
  assert meta["extras"]["extras_base"] == [
      "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
      "conditioner.embedders.1.model.logit_scale", "denoiser.sigmas"]
  cfg, params, _, _ = model_dir.load(out)
  assert cfg == ModelConfig(TINY.unet, None, TINY.text, TINY.vae, TINY.text_2) and cfg.parts == TINY.parts
  assert cfg.vae.scaling_factor == 0.13025
  for part in want:   # the file's tensors are the torch models' (OpenCLIP q/k/v split, projection transposed)
    assert_trees_equal(params[part], want[part], part)
  back = str(tmp_path / "back.safetensors")
  pipeline.to_torch(out, "ldm", back, **quiet)
  assert_same_file(sdxl_file, back)
  # diffusers' own single-file conversion reads our export (independent key tables)
  unet, vae, te1, te2 = models
  ckpt = {k: io.numpy_to_tensor(v) for k, v in io.load_torch_file(back).items()}
  n = lambda p: sum(k.startswith(p) for k in ckpt)
  for name, conv, ref, count in (
      ("unet", sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), unet, n(ldm.UNET_PREFIX)),
      ("vae", sfu.convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), vae, n(ldm.VAE_PREFIX)),
      ("clip_l", sfu.convert_ldm_clip_checkpoint(ckpt), te1, n(L) - 1),               # - position_ids
      ("open_clip", sfu.convert_open_clip_checkpoint(te2, ckpt, prefix=G), te2, n(G) - 1 + 2 * 2 * 3)):
    # OpenCLIP: logit_scale ignored, each layer's fused q/k/v weight and bias -> 3 tensors each
    if name == "clip_l":
      conv = {k[len("text_model."):]: v for k, v in conv.items() if not k.endswith("position_ids")}
    assert len(conv) == count, (name, len(conv), count)
    want_sd = ref.state_dict()    # what a strict load_state_dict needs
    assert sorted(conv) == sorted(k for k in want_sd if not k.endswith("position_ids")), name
    assert all(torch.equal(v, want_sd[k]) for k, v in conv.items()), name


def test_time_id_width_inferred_from_the_pooled_width(sdxl_file):
  unet = ldm.unet_ldm_to_diffusers({k[len(ldm.UNET_PREFIX):]: v for k, v in io.load_torch_file(sdxl_file).items()
                                    if k.startswith(ldm.UNET_PREFIX)})
  assert base.infer_unet_config(unet, 16).addition_time_embed_dim == 8      # (64 - 16) / 6
  full = base.infer_unet_config(unet)
  assert full.addition_time_embed_dim == 256 and full.attention_heads == (1, 1, 1)   # SDXL defaults
  assert full.transformer_depth == (1, 1, 2) and full.projection_class_embeddings_input_dim == 64


def test_open_clip_tables_bit_exact_in_bf16():
  rng = np.random.default_rng(0)
  sd = {"transformer.resblocks.0.attn.in_proj_weight": rng.standard_normal((12, 4)),
        "transformer.resblocks.0.attn.in_proj_bias": rng.standard_normal(12),
        "transformer.resblocks.0.mlp.c_fc.weight": rng.standard_normal((8, 4)),
        "text_projection": rng.standard_normal((4, 3)), "positional_embedding": rng.standard_normal((5, 4)),
        "logit_scale": np.float32(1.0)}
  sd = {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in sd.items()}
  hf, extras = sdxl_keys.open_clip_to_transformers(sd)
  assert list(extras) == ["logit_scale"] and hf["text_projection.weight"].shape == (3, 4)
  assert np.array_equal(hf["text_model.encoder.layers.0.self_attn.k_proj.weight"], sd[
      "transformer.resblocks.0.attn.in_proj_weight"][4:8])
  assert "text_model.encoder.layers.0.mlp.fc1.weight" in hf
  back = sdxl_keys.transformers_to_open_clip(hf)
  assert sorted(back) == sorted(k for k in sd if k != "logit_scale")
  assert all(back[k].dtype == sd[k].dtype and back[k].tobytes() == np.ascontiguousarray(sd[k]).tobytes()
             for k in back)


# ---------------------------------------------------------------- diffusers folder
@pytest.fixture(scope="module")
def sdxl_folder(models, tmp_path_factory):
  """A diffusers SDXL folder as on the hub (text encoders with `text_model.` names)."""
  unet, vae, te1, te2 = models
  d = tmp_path_factory.mktemp("sdxl_folder")
  unet.save_pretrained(str(d / "unet"))
  vae.save_pretrained(str(d / "vae"))
  cfg = json.load(open(d / "vae" / "config.json"))
  json.dump({**cfg, "scaling_factor": 0.13025}, open(d / "vae" / "config.json", "w"))   # SDXL's
  for name, te in (("text_encoder", te1), ("text_encoder_2", te2)):
    te.config.save_pretrained(str(d / name))
    io.save_torch_file(np_sd(te, True), str(d / name / "model.safetensors"), {"format": "pt"})
  from adiff_jax.tokenizer import CLIPTokenizer
  CLIPTokenizer.default().save_pretrained(d / "tokenizer")
  CLIPTokenizer.default(pad="!").save_pretrained(d / "tokenizer_2")
  return str(d)


def test_diffusers_folder_round_trip(sdxl_folder, want, models, tmp_path):
  out, back = str(tmp_path / "orbax"), str(tmp_path / "back")
  meta = pipeline.to_orbax(out, base_path=sdxl_folder, **quiet)
  assert meta["family"] == "sdxl" and meta["formats"]["base"] == "diffusers"
  cfg, params, _, _ = model_dir.load(out)
  assert cfg == ModelConfig(TINY.unet, None, TINY.text, TINY.vae, TINY.text_2)   # from the config.json files
  for part in want:
    assert_trees_equal(params[part], want[part], part)
  pipeline.to_torch(out, "diffusers", back, **quiet)
  for part, f in base.DIFFUSERS_WEIGHTS.items():
    assert_same_file(os.path.join(sdxl_folder, part, f), os.path.join(back, part, f))
  # diffusers / transformers load the export; configs read back to the same
  unet, _, _, te2 = models
  u = UNet2DConditionModel.from_pretrained(os.path.join(back, "unet"))
  assert base.unet_config_from_diffusers(dict(u.config)) == TINY.unet
  t2 = transformers.CLIPTextModelWithProjection.from_pretrained(os.path.join(back, "text_encoder_2"))
  ids = torch.from_numpy(sdxl_tokenizers(back)[1](["a cat!"])).long()
  assert all(torch.equal(v, te2.state_dict()[k]) for k, v in t2.state_dict().items())
  with torch.no_grad():   # (the loaded model may pick another attention kernel: float-level equal)
    torch.testing.assert_close(t2(ids).text_embeds, te2(ids).text_embeds, rtol=1e-5, atol=1e-6)
  assert sdxl_tokenizers(back)[1].pad_id == 0
  assert json.load(open(os.path.join(back, "vae", "config.json")))["scaling_factor"] == 0.13025


def test_inspect_names_sdxl(sdxl_file, sdxl_folder):
  text = inspect(sdxl_file)
  print(text)
  assert "format: sdxl:" in text and "model: SDXL base model" in text
  assert "conversion check: ok; converts: unet, vae, text_encoder, text_encoder_2 (SDXL)" in text
  text = inspect(sdxl_folder, check=False)   # (the same loader as the round trip above)
  assert "format: diffusers_folder" in text and "model: SDXL base model" in text and "  text_encoder_2: " in text


# ---------------------------------------------------------------- kohya / A1111 LoRAs
# kohya sd-scripts' LoRANetwork targets every Linear / Conv2d inside these modules (LoCon: the 3x3
# convs too); text encoders: CLIPAttention and CLIPMLP.
KOHYA_UNET_MODULES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TEXT_MODULES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def kohya_targets(models, naming: str) -> dict:
  """{kohya layer name: (part, torch module)} of the tiny SDXL models. naming "ldm": kohya
  sd-scripts' SDXL names (its SGM UNet: input_blocks / middle_block / output_blocks); "diffusers":
  the diffusers module paths some SDXL trainers write. The names are generated here; which module a
  name means is decided below by diffusers' own kohya loader, not by this table."""
  unet, _, te1, te2 = models
  out, linear = {}, (torch.nn.Linear, torch.nn.Conv2d)
  mods = {}
  for name, m in unet.named_modules():
    if type(m).__name__ in KOHYA_UNET_MODULES:
      mods.update({f"{name}.{c}": cm for c, cm in m.named_modules() if c and isinstance(cm, linear)})
  if naming == "ldm":   # layers kohya's LoRA leaves alone, which other trainers may include
    mods.update({n: unet.get_submodule(n) for n in ("conv_in", "conv_out", "time_embedding.linear_1",
                                                    "time_embedding.linear_2", "add_embedding.linear_1")})
  names = {n: n for n in mods}
  if naming == "ldm":   # (the LDM table is checked against diffusers' single-file converter above)
    names = {v: k[:-len(".weight")] for k, v in ldm.unet_diffusers_to_ldm({n + ".weight": n for n in mods}).items()}
  for n, m in mods.items():
    out["lora_unet_" + names[n].replace(".", "_")] = ("unet", m)
  for prefix, part, te in (("lora_te1_", "text_encoder", te1), ("lora_te2_", "text_encoder_2", te2)):
    for name, m in te.named_modules():
      if type(m).__name__ in KOHYA_TEXT_MODULES:
        for c, cm in m.named_children():
          if isinstance(cm, torch.nn.Linear):
            layer = "text_model." + f"{name}.{c}"[f"{name}.{c}".index("encoder."):]
            out[prefix + layer.replace(".", "_")] = (part, cm)
  return out


def kohya_file(targets: dict, seed: int, dtype=np.float16) -> dict:
  """Random LoRA tensors as kohya writes them: lora_down (r, in[, kh, kw]), lora_up (out, r[, 1, 1]),
  alpha (a scalar, != r)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for i, (name, (_, m)) in enumerate(sorted(targets.items())):
    w = m.weight
    r = 2 + i % 3
    sd[name + ".lora_down.weight"] = (0.3 * rng.standard_normal((r,) + tuple(w.shape[1:]))).astype(dtype)
    sd[name + ".lora_up.weight"] = (0.3 * rng.standard_normal((w.shape[0], r) + (1, 1) * (w.ndim == 4))).astype(dtype)
    sd[name + ".alpha"] = np.array(1.0 + i % 4, np.float32)
  return sd


def reference_merge(models, sd: dict, multiplier: float, kohya_scaling: bool) -> dict:
  """Our trees of the torch models with the LoRA fused by kohya's merge_to formula, each layer's
  module found by diffusers' own SDXL kohya loader (StableDiffusionXLPipeline.lora_state_dict:
  _maybe_map_sgm_blocks_to_diffusers + _convert_non_diffusers_lora_to_diffusers)."""
  import copy
  from diffusers import StableDiffusionXLPipeline
  fused = [copy.deepcopy(m) for m in models]
  unet, _, te1, te2 = fused
  roots = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
  text_names = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
  layers = {}
  for k, v in sd.items():
    layers.setdefault(k.split(".")[0], {})[k] = torch.from_numpy(np.asarray(v, np.float32))
  for name, one in sorted(layers.items()):
    conv, _ = StableDiffusionXLPipeline.lora_state_dict(dict(one), unet_config=unet.config)
    (key,) = [k for k in conv if ".down." in k]
    part, mod = key.split(".", 1)
    mod = mod.replace(".processor.", ".")
    for suffix in (".lora.down.weight", ".lora_linear_layer.down.weight"):
      mod = mod[:-len(suffix)] if mod.endswith(suffix) else mod
    for proc, proj in text_names.items():
      if mod.endswith("." + proc + ".down.weight"):
        mod = mod[:-len(proc + ".down.weight")] + (proj if part != "unet" else
                                                   {"to_out_lora": "to_out.0"}.get(proc, proc[:-5]))
    down, up = one[name + ".lora_down.weight"], one[name + ".lora_up.weight"]
    if not hasattr(roots[part], "text_model"):   # transformers v5's CLIPTextModel has no text_model level
      mod = mod.replace("text_model.", "", 1)
    module = roots[part].get_submodule(mod)
    w = module.weight.data
    scale = multiplier * (float(one[name + ".alpha"]) / down.shape[0] if kohya_scaling else 1.0)
    if w.ndim == 2:
      delta = up @ down
    elif down.shape[2:] == (1, 1):
      delta = (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
    else:
      delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    module.weight.data = w + scale * delta
  return {"unet": base.tree_from_diffusers(unet.state_dict(), "unet"),
          "text_encoder": base.tree_from_diffusers(te1.state_dict(), "text_encoder"),
          "text_encoder_2": base.tree_from_diffusers(te2.state_dict(), "text_encoder_2")}


def assert_trees_close(got, want, what, tol=1e-5):
  fa, fb = flatten(got), flatten(want)
  assert sorted(fa) == sorted(fb), (what, set(fa) ^ set(fb))
  err = max(float(np.abs(np.asarray(fa[k], np.float64) - fb[k]).max()) for k in fa)
  print(f"{what}: max abs err {err:.2e}")
  assert err < tol, what


@pytest.mark.parametrize("naming", ["ldm", "diffusers"])
def test_sdxl_kohya_lora_merged_as_diffusers_reads_it(models, want, sdxl_file, tmp_path, naming,
                                                       monkeypatch):
  """A kohya SDXL LoRA (UNet attention, feed-forward, projections, ResNet 3x3 and 1x1 convs, time
  embedding projections, down/upsamplers, LDM names also conv_in / conv_out / time_embed /
  label_emb; both text encoders) merged by us equals the same file
  fused into the torch models by hand, layer by layer as diffusers' kohya loader names them.
  LDM names go through `to-orbax --lora` (base loader stubbed; SDXL's default scaling is kohya's
  alpha/rank); diffusers names
  through `merge_kohya_lora_parts` with the default (official, alpha ignored) scaling."""
  targets = kohya_targets(models, naming)
  sd = kohya_file(targets, seed=7)
  names = {k.split(".")[0] for k in sd}
  if naming == "ldm":   # real kohya sd-scripts SDXL names
    for n in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_4_1_proj_in",
              "lora_unet_input_blocks_7_1_transformer_blocks_1_ff_net_0_proj", "lora_unet_input_blocks_1_0_in_layers_2",
              "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_input_blocks_3_0_op",
              "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0", "lora_unet_middle_block_2_emb_layers_1",
              "lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_8_0_out_layers_3",
              "lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_time_embed_2", "lora_unet_label_emb_0_0",
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_1_mlp_fc1"):
      assert n in names, n
  assert detect_keys(sd) == "kohya_lora" and lora_files.kohya_lora_family(sd) == "sdxl"
  src = str(tmp_path / f"sdxl_lora_{naming}.safetensors")
  io.save_torch_file(sd, src)
  scaling = naming == "ldm"
  ref = reference_merge(models, sd, 0.7, kohya_scaling=scaling)
  if naming == "ldm":
    # to-orbax's wiring (the base loader itself is tested above: it returns `want` for sdxl_file)
    monkeypatch.setattr(base, "load_base_model", lambda *a, **k: dict(
        want, unet_config=TINY.unet, text_config=TINY.text, text_config_2=TINY.text_2, vae_config=TINY.vae,
        format="ldm", family="sdxl", extras={}))
    out = str(tmp_path / "orbax")
    meta = pipeline.to_orbax(out, base_path=sdxl_file, loras=[(src, 0.7)], **quiet)   # SDXL: alpha/rank
    assert any(f"merged {len(names)} kohya LoRA layers" in n for n in meta["notes"]), meta["notes"]
    got = model_dir.load_items(out, ["unet", "text_encoder", "text_encoder_2"])[0]
  else:
    info = {}
    got = lora_files.merge_kohya_lora_parts(want, src, 0.7, info=info)
    assert any("alpha/rank" in n and "--kohya-scaling" in n for n in info["notes"]), info["notes"]
  for part in ("unet", "text_encoder", "text_encoder_2"):
    assert_trees_close(got[part], ref[part], f"{naming} {part}")
    changed = sum(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got[part]), jax.tree.leaves(want[part])))
    assert changed > 0, part
  text = inspect(src)
  assert "format: kohya_lora" in text and "model: SDXL LoRA" in text and "keys outside" not in text, text


def test_sdxl_kohya_lora_errors(models, want, tmp_path):
  sd = kohya_file(kohya_targets(models, "ldm"), seed=8)
  src = _save(sd, tmp_path / "sdxl_lora.safetensors")
  # an SD1.5 model (no text_encoder_2): the te2 layers are not found, named with the missing part
  with pytest.raises(ConversionError, match=r"not found in the model: lora_te2_.*no text_encoder_2"):
    lora_files.merge_kohya_lora(want["unet"], want["text_encoder"], src)
  bad = dict(sd)
  bad["lora_unet_input_blocks_99_1_proj_in.lora_down.weight"] = sd["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"]
  bad["lora_unet_input_blocks_99_1_proj_in.lora_up.weight"] = sd["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"]
  with pytest.raises(ConversionError, match=r"not found in the model: lora_unet_input_blocks_99_1_proj_in \(1 in all\)"):
    lora_files.merge_kohya_lora_parts(want, _save(bad, tmp_path / "bad.safetensors"))
  # an SD1.5 LoRA on the SDXL model: its cross-attention reads 768-wide text
  sd15 = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
          np.zeros((4, 768), np.float16),
          "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
          np.zeros((64, 4), np.float16)}
  assert lora_files.kohya_lora_family(sd15) == "sd15"
  with pytest.raises(ConversionError, match=r"shape mismatch.*an SD1.5 LoRA on an SDXL model"):
    lora_files.merge_kohya_lora_parts(want, _save(sd15, tmp_path / "sd15.safetensors"))


# ---------------------------------------------------------------- refused
def test_refiner_and_sd2_refused(models, sdxl_file, sdxl_folder, tmp_path):
  sd = io.load_torch_file(sdxl_file)
  refiner = {k.replace(G, sdxl_keys.REFINER_CLIP_G_PREFIX): v for k, v in sd.items() if not k.startswith(L)}
  p = str(tmp_path / "refiner.safetensors")
  io.save_torch_file(refiner, p)
  assert detect_keys(refiner) == "sdxl_refiner"
  with pytest.raises(ConversionError, match="SDXL refiner"):
    base.load_base_model(p, overrides=OVERRIDES)
  text = inspect(p)
  assert "sdxl_refiner" in text and "conversion check" not in text
  # a refiner UNet alone: its added embedding takes pooled text as wide as the context + 5 time ids
  unet_only = {k: v for k, v in sd.items() if k.startswith(ldm.UNET_PREFIX)}
  with pytest.raises(ConversionError, match="SDXL refiner"):
    base.load_base_model(_save(unet_only, tmp_path / "u.safetensors"),
                         overrides={"unet": {**OVERRIDES["unet"], "addition_time_embed_dim": 6,
                                             "projection_class_embeddings_input_dim": 32 + 5 * 6}})
  # a diffusers refiner folder: text_encoder_2/ without text_encoder/
  d = tmp_path / "refiner_folder"
  os.makedirs(d)
  for part in ("unet", "vae", "text_encoder_2"):
    os.symlink(os.path.join(sdxl_folder, part), d / part)
  with pytest.raises(ConversionError, match="SDXL refiner"):
    base.load_base_model(str(d))
  sd2 = {ldm.UNET_PREFIX + "out.2.bias": np.zeros(4, np.float32),
         "cond_stage_model.model.token_embedding.weight": np.zeros((4, 4), np.float32)}
  with pytest.raises(ConversionError, match="SD2.x .*not supported yet"):
    base.load_base_model(_save(sd2, tmp_path / "sd2.safetensors"))


def test_mismatched_sdxl_parts_refused(sdxl_file, tmp_path):
  sd = io.load_torch_file(sdxl_file)
  sd = {k: v for k, v in sd.items() if not (k.startswith(G) and ".resblocks." not in k and "ln_final" not in k
                                            and k != G + "logit_scale")}
  sd[G + "token_embedding.weight"] = np.zeros((49408, 16), np.float32)
  sd[G + "positional_embedding"] = np.zeros((77, 16), np.float32)
  sd[G + "text_projection"] = np.zeros((16, 24), np.float32)   # pooled 24, the UNet wants 16
  with pytest.raises(ConversionError, match="do not fit together.*pooled text of width 16"):
    base.load_base_model(_save(sd, tmp_path / "bad.safetensors"),
                         overrides={**OVERRIDES, "unet": {**OVERRIDES["unet"], "addition_time_embed_dim": 8}})


def _save(sd, path):
  io.save_torch_file(sd, str(path))
  return str(path)


# ---------------------------------------------------------------- full-size key tables (slow, shapes only)
@pytest.mark.slow
def test_full_size_single_file_tables_read_by_diffusers():
  """Our SDXL single-file names at full size (zero-stride arrays: no memory), read by diffusers'
  convert_ldm_unet_checkpoint / convert_open_clip_checkpoint into the shapes of its own full-size
  SDXL UNet and transformers' bigG (torch meta device)."""
  from convert_weights.tree import tree_to_state_dict
  from adiff_jax.model import param_shapes
  full = ModelConfig.sdxl(motion=None)
  stub = lambda tree: jax.tree.map(lambda s: np.broadcast_to(np.zeros((), np.float16), s.shape), tree)
  shapes = param_shapes(full)
  sd = sdxl_keys.join_sdxl(tree_to_state_dict(stub(shapes["unet"])), {},
                           tree_to_state_dict(stub(shapes["text_encoder"])),
                           tree_to_state_dict(stub(shapes["text_encoder_2"])))
  assert sd[G + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
  assert sd[G + "text_projection"].shape == (1280, 1280) and sd[G + "positional_embedding"].shape == (77, 1280)
  assert sd[ldm.UNET_PREFIX + "label_emb.0.0.weight"].shape == (1280, 2816)
  ckpt = {k: torch.empty(v.shape, dtype=torch.float16, device="meta") for k, v in sd.items()}
  unet_cfg = base.unet_config_to_diffusers(full.unet)
  with torch.device("meta"):
    unet = UNet2DConditionModel(**{k: v for k, v in unet_cfg.items() if not k.startswith("_")})
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **{k: v for k, v in base.text_config_to_transformers(full.text_2).items()
           if k not in ("architectures", "model_type")}))
  for name, conv, ref in (("unet", sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), unet),
                          ("open_clip", sfu.convert_open_clip_checkpoint(te2, ckpt, prefix=G), te2)):
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in conv.items()} == want, name
  n = sum(int(np.prod(v.shape)) for k, v in sd.items() if k.startswith(ldm.UNET_PREFIX))
  assert n == 2_567_463_684
