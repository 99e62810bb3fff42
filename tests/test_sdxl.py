"""SDXL: the UNet (per-level depth, linear projections, text_time added embedding) and the
AnimateDiff SDXL motion module (motion-module GroupNorm pooled over frames), against diffusers'
UNet2DConditionModel / UNetMotionModel with random weights; the motion-module file layout."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

from adiff_jax.errors import InputError
from adiff_jax.model import param_shapes
from adiff_jax.motion_module import MotionModuleConfig, split_motion_module
from adiff_jax.params import flatten
from adiff_jax.unet import UNet3D, UNetConfig
from convert_weights import io, motion_module_files as motion
from convert_weights.detect import detect_keys, motion_module_family
from convert_weights.inspect_cmd import inspect
from convert_weights.motion_module_keys import diffusers_to_official
from convert_weights.sd_base import unet_config_from_diffusers
from torch_ref import randomize_, to_numpy_sd, unet_params_from_diffusers

TEXT_DIM, TIME_DIM = 16, 8
TINY_XL = dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(2, 4, 4),
               transformer_layers_per_block=(1, 1, 2), cross_attention_dim=32, norm_num_groups=8,
               sample_size=8, use_linear_projection=True, addition_embed_type="text_time",
               addition_time_embed_dim=TIME_DIM,
               projection_class_embeddings_input_dim=TEXT_DIM + 6 * TIME_DIM,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
OURS = UNetConfig.sdxl(block_out_channels=(32, 64, 64), attention_heads=(2, 4, 4),
                       transformer_depth=(1, 1, 2), cross_attention_dim=32, norm_num_groups=8,
                       addition_time_embed_dim=TIME_DIM,
                       projection_class_embeddings_input_dim=TEXT_DIM + 6 * TIME_DIM)
MM = MotionModuleConfig.sdxl(num_heads=2, norm_groups=8)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def inputs(b=2, f=4, s=8, seed=0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((b, f, s, s, 4)).astype(np.float32)
  t = np.array([10.0, 731.0][:b], np.float32)
  ctx = rng.standard_normal((b, 7, 32)).astype(np.float32)
  added = {"text_embeds": rng.standard_normal((b, TEXT_DIM)).astype(np.float32),
           "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 8, 1024, 1024]][:b],
                                np.float32)}
  return sample, t, ctx, added


@pytest.fixture(scope="module")
def motion_ref():
  """A tiny SDXL-like UNetMotionModel (SDXL motion adapter options), random weights."""
  torch.manual_seed(0)
  unet2d = UNet2DConditionModel(**TINY_XL)
  adapter = MotionAdapter(block_out_channels=(32, 64, 64), motion_layers_per_block=2,
                          motion_num_attention_heads=2, motion_norm_num_groups=8,
                          motion_max_seq_length=32, use_motion_mid_block=False)
  return randomize_(UNetMotionModel.from_unet2d(unet2d, adapter), 1).eval()


def test_config_from_diffusers_and_presets():
  assert unet_config_from_diffusers(dict(TINY_XL)) == OURS
  full = UNetConfig.sdxl()
  assert full.depths == (1, 2, 10) and full.heads == (5, 10, 20)
  assert [c // h for c, h in zip(full.block_out_channels, full.heads)] == [64, 64, 64]
  assert full.added_cond_shapes == {"text_embeds": 1280, "time_ids": 6}
  assert MotionModuleConfig.preset("sdxl") == MotionModuleConfig.sdxl()
  assert UNetConfig.sd15().depths == (1, 1, 1, 1) and UNetConfig.sd15().added_cond_shapes is None


def test_image_unet_matches_diffusers_unet2d():
  """motion=None with added cond: the SDXL image UNet per frame."""
  torch.manual_seed(0)
  ref = randomize_(UNet2DConditionModel(**TINY_XL), 3).eval()
  sample, t, ctx, added = inputs(f=2)
  b, f = sample.shape[:2]
  with torch.no_grad():
    x = torch.from_numpy(sample).reshape(b * f, 8, 8, 4).permute(0, 3, 1, 2)
    rep = lambda a: torch.from_numpy(np.repeat(a, f, axis=0))
    out = ref(x, rep(t), rep(ctx), added_cond_kwargs={k: rep(v) for k, v in added.items()}).sample
  want = out.permute(0, 2, 3, 1).reshape(b, f, 8, 8, 4).numpy()
  params = unet_params_from_diffusers(ref)
  assert "add_embedding" in params
  got = UNet3D(OURS).apply({"params": params}, sample, t, ctx, added_cond=added)
  err = rel_err(got, want)
  print(f"SDXL image UNet: max abs err / output scale = {err:.2e}")
  assert err < 1e-4
  # The added embedding acts.
  other = dict(added, time_ids=added["time_ids"] + 64)
  assert rel_err(UNet3D(OURS).apply({"params": params}, sample, t, ctx, added_cond=other), want) > 1e-3


def test_video_unet_matches_diffusers_unet_motion_model(motion_ref):
  """SDXL motion modules at all 3 levels, none in the mid block, GroupNorm pooled over frames:
  diffusers pools too, so the reference is used as is (no patch)."""
  sample, t, ctx, added = inputs(f=5)
  b, f = sample.shape[:2]
  with torch.no_grad():
    x = torch.from_numpy(sample).permute(0, 4, 1, 2, 3)
    text = torch.from_numpy(np.repeat(ctx, f, axis=0))
    out = motion_ref(x, torch.from_numpy(t), text,
                     added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample
  want = out.permute(0, 2, 3, 4, 1).numpy()
  params = unet_params_from_diffusers(motion_ref)
  mods = sorted({"/".join(k.split("/")[:2]) for k in flatten(split_motion_module(params)[1])})
  assert mods == [f"down_blocks_{i}/motion_modules_{j}" for i in range(3) for j in range(2)] + [
      f"up_blocks_{i}/motion_modules_{j}" for i in range(3) for j in range(3)]
  got = UNet3D(OURS, MM).apply({"params": params}, sample, t, ctx, added_cond=added)
  err = rel_err(got, want)
  print(f"SDXL video UNet: max abs err / output scale = {err:.2e}")
  assert err < 1e-4
  per_frame = UNet3D(OURS, MotionModuleConfig.sdxl(num_heads=2, norm_groups=8, norm_across_frames=False))
  assert rel_err(per_frame.apply({"params": params}, sample, t, ctx, added_cond=added), want) > 1e-3


@pytest.mark.parametrize("config,added,match", [
    (OURS, None, "needs added_cond"),
    (OURS, {"text_embeds": (2, TEXT_DIM)}, "needs added_cond"),
    (OURS, {"text_embeds": (2, TEXT_DIM + 1), "time_ids": (2, 6)}, r"text_embeds.*shape \(2, 16\)"),
    (OURS, {"text_embeds": (2, TEXT_DIM), "time_ids": (1, 6)}, r"time_ids.*shape \(2, 6\)"),
    (UNetConfig.tiny(), {"text_embeds": (2, 16), "time_ids": (2, 6)}, "no added embedding"),
])
def test_added_cond_errors_before_compile(config, added, match):
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((2, 2, 8, 8, 4), (2,), (2, 7, 32))]
  added = None if added is None else {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in added.items()}
  with pytest.raises(InputError, match=match):
    jax.eval_shape(UNet3D(config).init, jax.random.key(0), *args, added_cond=added)


def test_config_errors():
  with pytest.raises(InputError, match="one int or one entry"):
    UNetConfig.sdxl(transformer_depth=(1, 2))
  with pytest.raises(InputError, match="at least one block"):
    UNetConfig.sdxl(transformer_depth=(1, 0, 10))
  with pytest.raises(InputError, match="text_time"):
    UNetConfig.sdxl(addition_embed_type="text")


def test_sd15_tree_and_trace_unchanged():
  """No added embedding in an SD1.5 tree; an int depth traces exactly like the same per-level tuple."""
  a, b = UNetConfig.tiny(), UNetConfig.tiny(transformer_depth=(1, 1))
  mm = MotionModuleConfig.v2(num_heads=2, norm_groups=8)
  shapes = param_shapes(a, mm)
  assert "add_embedding" not in shapes
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda s: s.shape, param_shapes(b, mm))
  x, t, c = jnp.zeros((1, 2, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 32))
  p = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  ja = str(jax.make_jaxpr(UNet3D(a, mm).apply)({"params": p}, x, t, c))
  jb = str(jax.make_jaxpr(UNet3D(b, mm).apply)({"params": p}, x, t, c))
  assert ja == jb


def test_full_size_param_counts_match_diffusers():
  """SDXL UNet and SDXL motion adapter at full size: shapes only (eval_shape / torch meta)."""
  with torch.device("meta"):
    ref = UNet2DConditionModel(
        block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    adapter = MotionAdapter(block_out_channels=(320, 640, 1280), motion_layers_per_block=2,
                            motion_num_attention_heads=8, motion_max_seq_length=32,
                            use_motion_mid_block=False)
  want_unet = sum(p.numel() for p in ref.parameters())
  want_mm = sum(p.numel() for p in adapter.parameters())
  count = lambda tree: sum(int(np.prod(s.shape)) for s in jax.tree.leaves(tree))
  image, mm = split_motion_module(param_shapes(UNetConfig.sdxl(), MotionModuleConfig.sdxl()))
  print(f"SDXL UNet {count(image):,} (diffusers {want_unet:,}); motion module {count(mm):,} "
        f"(diffusers {want_mm:,})")
  assert count(image) == want_unet == 2_567_463_684
  assert count(mm) == want_mm


def official_layout(ref) -> dict:
  """The original (mm_sdxl_v10_beta) layout: official names, a pe buffer per attention block."""
  out = {}
  for k, v in to_numpy_sd(ref).items():
    if "motion_modules." not in k:
      continue
    if k.endswith("pos_embed.pe"):
      for i in (0, 1):
        out[diffusers_to_official(k.replace("pos_embed.pe", f"attn{i + 1}.pos_encoder.pe"))] = v
    else:
      out[diffusers_to_official(k)] = v
  return out


@pytest.mark.parametrize("ext", ["ckpt", "safetensors"])
def test_motion_module_file_round_trip_and_inspect(motion_ref, tmp_path, ext):
  sd = official_layout(motion_ref)
  prefixes = sorted({k.split(".temporal_transformer.")[0] for k in sd})
  assert prefixes == sorted([f"down_blocks.{i}.motion_modules.{j}" for i in range(3) for j in range(2)]
                            + [f"up_blocks.{i}.motion_modules.{j}" for i in range(3) for j in range(3)])
  assert motion_module_family(sd) == "sdxl" and detect_keys(sd) == "motion_module_original"
  src = str(tmp_path / f"mm_sdxl.{ext}")
  io.save_torch_file(sd, src)
  info = {}
  tree, cfg, version = motion.load_motion_module(src, num_heads=2, norm_groups=8, info=info)
  assert version == "sdxl" and cfg == MM, cfg
  want = split_motion_module(unet_params_from_diffusers(motion_ref))[1]
  assert jax.tree.structure(tree) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(want)):
    assert np.array_equal(a, b)
  back = str(tmp_path / f"back.{ext}")
  motion.export_motion_module(tree, cfg, back, extras=info["extras"])
  sa, sb = io.load_torch_file(src), io.load_torch_file(back)
  assert sorted(sa) == sorted(sb)
  assert all(sa[k].dtype == sb[k].dtype and sa[k].tobytes() == sb[k].tobytes() for k in sa)
  text = inspect(src)
  print(text)
  assert "SDXL motion module" in text and "version sdxl" in text and "FAILED" not in text


def test_motion_adapter_folder_round_trip(motion_ref, tmp_path):
  """diffusers MotionAdapter layout (3 levels, no mid): loads as sdxl, exports loadable by diffusers."""
  src = str(tmp_path / "mm.safetensors")
  io.save_torch_file(official_layout(motion_ref), src)
  tree, cfg, _ = motion.load_motion_module(src, num_heads=2, norm_groups=8)
  out = str(tmp_path / "adapter")
  motion.export_motion_module(tree, cfg, out, fmt="diffusers")
  adapter = MotionAdapter.from_pretrained(out)
  assert adapter.config.use_motion_mid_block is False and list(adapter.config.block_out_channels) == [32, 64, 64]
  tree2, cfg2, version = motion.load_motion_module(out)
  assert version == "sdxl" and cfg2 == cfg
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(tree2)):
    assert np.array_equal(a, b)


def motion_lora_file(ref, seed: int, rank: int = 2, extra_level: bool = False) -> dict:
  """A MotionLoRA in the official processor layout (`...attention_blocks.N.processor.to_q_lora.
  down.weight`) on the temporal attention of `ref`'s motion modules. extra_level: also a 4th level
  (down_blocks.3 / up_blocks.3), as every SD1.5 MotionLoRA has."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, m in ref.named_modules():
    if not re.search(r"motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name):
      continue
    off = diffusers_to_official(name + ".weight")[:-len(".weight")]
    mod, proj = (off[:-len(".to_out.0")], "to_out") if off.endswith(".to_out.0") else off.rsplit(".", 1)
    names = [mod] + ([mod.replace("down_blocks.2.", "down_blocks.3.").replace("up_blocks.2.", "up_blocks.3.")]
                     if extra_level and ("down_blocks.2." in mod or "up_blocks.2." in mod) else [])
    for n in names:
      sd[f"{n}.processor.{proj}_lora.down.weight"] = rng.standard_normal((rank, m.in_features)).astype(np.float32)
      sd[f"{n}.processor.{proj}_lora.up.weight"] = rng.standard_normal((m.out_features, rank)).astype(np.float32) * 0.1
  return sd


def test_motion_lora_on_the_sdxl_motion_module(motion_ref, tmp_path):
  """The official sdxl branch applies no MotionLoRAs (no motion_module_lora_configs; none were
  published), but a MotionLoRA in the official layout made for the SDXL motion module converts and
  targets exactly the kernels the official merge W += alpha * up @ down changes (checked on the
  weights: the runtime LoRA layer itself is tested on SD1.5); an SD1.5 MotionLoRA (4 levels) is
  refused, at conversion and when a converted one is loaded beside the SDXL motion module."""
  import copy
  from adiff_jax import model_dir
  from convert_weights import convert
  from convert_weights.errors import ConversionError
  quiet = dict(log=lambda s: None)
  mm = str(tmp_path / "mm_sdxl.safetensors")
  io.save_torch_file(official_layout(motion_ref), mm)
  sd = motion_lora_file(motion_ref, 3)
  assert len(sd) == 2 * 4 * 2 * (6 + 9)   # down/up x q,k,v,out x 2 attention blocks x 15 modules
  src = str(tmp_path / "motion_lora_sdxl.safetensors")
  io.save_torch_file(sd, src)
  out = str(tmp_path / "mm_dir")
  convert.to_orbax(out, motion_module=mm, motion_loras=[(src, 0.7)], mm_version="sdxl",
                   overrides={"motion_module": {"num_heads": 2, "norm_groups": 8}}, **quiet)
  cfg, params, lora, _ = model_dir.load(out, parts=())
  assert cfg.motion == MM and lora is not None
  # torch reference: the LoRA merged into the diffusers motion attention
  ref = copy.deepcopy(motion_ref)
  official = {diffusers_to_official(n + ".weight")[:-len(".weight")]: m for n, m in ref.named_modules()
              if "motion_modules." in n and isinstance(m, torch.nn.Linear)}
  for k in sd:
    if k.endswith("down.weight"):
      mod, proj = k.split(".processor.")
      proj = proj.split("_lora.")[0]
      w = official[f"{mod}.{'to_out.0' if proj == 'to_out' else proj}"].weight
      w.data += 0.7 * torch.from_numpy(sd[k.replace("down.weight", "up.weight")] @ sd[k])
  # our runtime LoRA folded into the kernels (what LoRADense computes) = the torch model's merged weights
  from adiff_jax.lora import merge_lora
  before = unet_params_from_diffusers(motion_ref)
  merged, want, before = flatten(merge_lora(before, lora)), flatten(unet_params_from_diffusers(ref)), flatten(before)
  assert sorted(merged) == sorted(want)
  err = max(float(np.abs(np.asarray(merged[k]) - want[k]).max()) for k in want)
  moved = sum(not np.array_equal(np.asarray(merged[k]), before[k]) for k in want)
  print(f"SDXL motion module + MotionLoRA: max abs err on the merged weights {err:.2e}, {moved} kernels moved")
  assert err < 1e-6 and moved == len(sd) // 2
  # an SD1.5 MotionLoRA (a 4th level) on the SDXL motion module: refused, not silently half-applied
  bad = str(tmp_path / "sd15_style.safetensors")
  io.save_torch_file(motion_lora_file(motion_ref, 4, extra_level=True), bad)
  with pytest.raises(ConversionError, match=r"down_blocks_3/motion_modules_0.*SD1.5 MotionLoRA on the SDXL motion module"):
    convert.to_orbax(str(tmp_path / "x"), motion_module=mm, motion_loras=[(bad, 1.0)], mm_version="sdxl",
                     overrides={"motion_module": {"num_heads": 2, "norm_groups": 8}}, **quiet)
  lora_dir = str(tmp_path / "lora_dir")
  convert.to_orbax(lora_dir, motion_loras=[(bad, 1.0)], **quiet)   # alone: nothing to check it against
  with pytest.raises(InputError, match=r"lora_dir: targets down_blocks_3/motion_modules_0.*SDXL motion module"):
    model_dir.load(out, parts=(), motion_loras=[(lora_dir, 1.0)])
