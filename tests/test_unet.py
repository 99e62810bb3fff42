"""Parity of the video UNet against independent PyTorch references (diffusers), random weights."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

from adiff_jax.layers import GroupNorm
from adiff_jax.params import random_init
from adiff_jax.motion_module import MotionModuleConfig
from adiff_jax.unet import UNet3D, UNetConfig
from torch_ref import (patch_base_norms_across_frames, patch_motion_norms_per_frame, randomize_,
                       unet_params_from_diffusers)

TINY = dict(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=2,
            cross_attention_dim=32, norm_num_groups=8, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
OURS = UNetConfig.tiny()


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def active_params(model, *args):
  """Random params with every tensor perturbed, so zero-initialised motion modules act too."""
  rng = np.random.default_rng(5)
  return jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
                      random_init(model, *args))


def inputs(b=2, f=4, s=8, seed=0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((b, f, s, s, 4)).astype(np.float32)
  t = np.array([10.0, 731.0][:b], np.float32)
  ctx = rng.standard_normal((b, 7, 32)).astype(np.float32)
  return sample, t, ctx


def torch_unet2d(seed=0):
  return randomize_(UNet2DConditionModel(**TINY), seed).eval()


def test_spatial_path_matches_diffusers_unet2d():
  """motion=None: our video UNet is the image UNet applied per frame (frames as batch)."""
  ref = torch_unet2d()
  sample, t, ctx = inputs()
  b, f = sample.shape[:2]
  with torch.no_grad():
    x = torch.from_numpy(sample).reshape(b * f, 8, 8, 4).permute(0, 3, 1, 2)
    out = ref(x, torch.from_numpy(np.repeat(t, f)),
              torch.from_numpy(np.repeat(ctx, f, axis=0))).sample
  want = out.permute(0, 2, 3, 1).reshape(b, f, 8, 8, 4).numpy()
  params = unet_params_from_diffusers(ref)
  got = UNet3D(OURS).apply({"params": params}, sample, t, ctx)
  err = rel_err(got, want)
  print(f"spatial path: max abs err / output scale = {err:.2e}")
  assert err < 1e-4


def motion_reference(adapter_kw, frames, seed=0):
  unet2d = torch_unet2d(seed)
  adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2,
                          motion_mid_block_layers_per_block=1, motion_num_attention_heads=2,
                          motion_norm_num_groups=8, **adapter_kw)
  ref = UNetMotionModel.from_unet2d(unet2d, adapter)
  randomize_(ref, seed + 1).eval()
  params = unet_params_from_diffusers(ref)   # before patching: the patch wraps modules
  patch_motion_norms_per_frame(ref, frames)
  return ref, params


def run_motion_reference(ref, sample, t, ctx):
  with torch.no_grad():
    b, f = sample.shape[:2]
    x = torch.from_numpy(sample).permute(0, 4, 1, 2, 3)  # (B, C, F, H, W)
    # diffusers >= 0.42 wants the text already repeated per frame: (B*F, L, D)
    text = torch.from_numpy(np.repeat(ctx, f, axis=0))
    out = ref(x, torch.from_numpy(t), text).sample
  return out.permute(0, 2, 3, 4, 1).numpy()


@pytest.mark.parametrize("mid_block,max_len", [(True, 32), (False, 24)])
def test_video_unet_matches_diffusers_unet_motion_model(mid_block, max_len):
  sample, t, ctx = inputs(f=6)
  ref, params = motion_reference(dict(use_motion_mid_block=mid_block, motion_max_seq_length=max_len),
                                 frames=6)
  want = run_motion_reference(ref, sample, t, ctx)
  mm = MotionModuleConfig(num_heads=2, norm_groups=8, max_len=max_len, mid_block=mid_block)
  got = UNet3D(OURS, mm).apply({"params": params}, sample, t, ctx)
  err = rel_err(got, want)
  print(f"video UNet (mid_block={mid_block}): max abs err / output scale = {err:.2e}")
  assert err < 1e-4
  # The motion modules really act: the result differs from the image UNet alone.
  base_only = {k: v for k, v in params.items()}
  img = UNet3D(OURS).apply({"params": base_only}, sample, t, ctx)
  assert rel_err(img, want) > 1e-2


def test_v1_cross_frame_groupnorm_matches_patched_reference():
  """v1: base-UNet ResNet norms and conv_norm_out pool statistics over frames."""
  sample, t, ctx = inputs(f=5)
  ref, params = motion_reference(dict(use_motion_mid_block=False, motion_max_seq_length=24), frames=5)
  patch_base_norms_across_frames(ref, 5)
  want = run_motion_reference(ref, sample, t, ctx)
  mm = MotionModuleConfig.v1(num_heads=2, norm_groups=8)
  got = UNet3D(OURS, mm).apply({"params": params}, sample, t, ctx)
  err = rel_err(got, want)
  print(f"v1 video UNet: max abs err / output scale = {err:.2e}")
  assert err < 1e-4
  per_frame = UNet3D(OURS, MotionModuleConfig(num_heads=2, norm_groups=8, max_len=24)).apply(
      {"params": params}, sample, t, ctx)
  assert rel_err(per_frame, want) > 1e-3


def test_groupnorm_across_frames_direct():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 4, 5, 8)).astype(np.float32) * 3 + 1
  for across in (False, True):
    gn = GroupNorm(4, 1e-5, across_frames=across)
    p = gn.init(jax.random.key(0), x)
    got = np.asarray(gn.apply(p, x))
    g = x.reshape(2, 3, 4, 5, 4, 2).astype(np.float64)
    axes = (1, 2, 3, 5) if across else (2, 3, 5)
    mean = g.mean(axis=axes, keepdims=True)
    var = g.var(axis=axes, keepdims=True)
    want = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_per_frame_text_and_timesteps():
  """(B, L, D) text equals the same text given per frame; (B,) timesteps equal (B, F)."""
  sample, t, ctx = inputs(f=3)
  model = UNet3D(OURS, MotionModuleConfig(num_heads=2, norm_groups=8))
  params = active_params(model, sample, t, ctx)
  a = model.apply({"params": params}, sample, t, ctx)
  ctx_f = np.repeat(ctx[:, None], 3, axis=1)
  t_f = np.repeat(t[:, None], 3, axis=1)
  b = model.apply({"params": params}, sample, t_f, ctx_f)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(sample=(2, 40, 8, 8, 4)), "positional encoding"),
    (dict(sample=(2, 4, 7, 8, 4)), "not divisible"),
    (dict(sample=(2, 4, 8, 8, 3)), "channels"),
    (dict(sample=(2, 8, 8, 4)), r"\(B, F, H, W, C\)"),
    (dict(ctx=(3, 7, 32)), "text context"),
    (dict(ctx=(2, 7, 16)), "cross_attention_dim"),
    (dict(t=(3,)), "timesteps"),
])
def test_bad_input_errors_before_compile(bad, match):
  model = UNet3D(OURS, MotionModuleConfig(num_heads=2, norm_groups=8))
  shapes = dict(sample=(2, 4, 8, 8, 4), t=(2,), ctx=(2, 7, 32))
  shapes.update(bad)
  args = [jax.ShapeDtypeStruct(shapes[k], jnp.float32) for k in ("sample", "t", "ctx")]
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), *args)


def test_lora_scale_and_merge():
  """Unmerged LoRA at scale s equals merging it; two LoRAs stack; scale 0 is the base model."""
  from adiff_jax import lora as L
  sample, t, ctx = inputs(f=3)
  model = UNet3D(OURS, MotionModuleConfig(num_heads=2, norm_groups=8))
  params = active_params(model, sample, t, ctx)
  k1, k2 = jax.random.split(jax.random.key(1))
  rand_up = lambda tree, key: jax.tree_util.tree_map_with_path(
      lambda p, v: jax.random.normal(key, v.shape) * 0.3 if p[-1].key == "up" else v, tree)
  mlora = rand_up(L.init_lora(k1, params, 4, L.motion_lora_filter), k1)
  dlora = rand_up(L.init_lora(k2, params, 8, L.domain_adapter_filter), k2)
  both = L.combine_loras([(mlora, 0.7), (dlora, 1.3)])
  base = model.apply({"params": params}, sample, t, ctx)
  unmerged = model.apply({"params": params, "lora": both}, sample, t, ctx)
  merged = model.apply({"params": L.merge_lora(params, both)}, sample, t, ctx)
  assert rel_err(unmerged, base) > 1e-3
  np.testing.assert_allclose(unmerged, merged, atol=2e-5 * np.abs(base).max())
  zero = L.combine_loras([(mlora, 0.0), (dlora, 0.0)])
  np.testing.assert_allclose(model.apply({"params": params, "lora": zero}, sample, t, ctx), base,
                             atol=1e-6)
  # Targets: MotionLoRA only on temporal attention, domain adapter only on spatial attention.
  assert all("motion_modules_" in p for p in L.lora_targets(params, L.motion_lora_filter))
  assert not any("motion_modules_" in p for p in L.lora_targets(params, L.domain_adapter_filter))


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"  # unoptimised LLVM: half the compile time, both sides
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from adiff_jax.unet import UNet3D, UNetConfig
    from adiff_jax.motion_module import MotionModuleConfig
    from adiff_jax.sharding import make_mesh, video_sharding
    from jax.sharding import NamedSharding, PartitionSpec as P
    assert len(jax.devices()) == 8
    model = UNet3D(UNetConfig.tiny(), MotionModuleConfig.v2(num_heads=2, norm_groups=8))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 8, 4)).astype(np.float32)
    t = np.array([3.0, 500.0], np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    from adiff_jax.params import random_init
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
                          random_init(model, x, t, ctx))
    one = jax.jit(model.apply)({"params": params}, x, t, ctx)
    mesh = make_mesh(data=2, frames=4)
    with jax.set_mesh(mesh):
      f = jax.jit(model.apply, in_shardings=(NamedSharding(mesh, P()), video_sharding(mesh),
                                             NamedSharding(mesh, P("data")),
                                             NamedSharding(mesh, P("data"))),
                  out_shardings=video_sharding(mesh))
      out = f({"params": params}, x, t, ctx)
      hlo = f.lower({"params": params}, x, t, ctx).compile().as_text()
    assert out.sharding.spec[:2] == ("data", "frames"), out.sharding
    err = float(np.abs(np.asarray(out) - np.asarray(one)).max() / np.abs(np.asarray(one)).max())
    print("sharded rel err", err, "all-to-all" in hlo)
    assert err < 1e-5, err
""")


def test_sharded_8_devices_equals_single_device():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  print(r.stdout)


def test_remat_same_gradients_and_bf16_close():
  """remat changes memory, not maths; bf16 compute with f32 params stays close to f32."""
  sample, t, ctx = inputs(b=1, f=3)
  mm = MotionModuleConfig(num_heads=2, norm_groups=8)
  # One level, one layer: this compiles two backward passes.
  small = UNetConfig.tiny(block_out_channels=(32,), cross_attention_levels=(True,), layers_per_block=1)
  params = active_params(UNet3D(small, mm), sample, t[:1], ctx[:1])

  def loss(p, model):
    return jnp.mean(model.apply({"params": p}, sample, t[:1], ctx[:1]) ** 2)

  g1 = jax.jit(jax.grad(lambda p: loss(p, UNet3D(small, mm))))(params)
  g2 = jax.jit(jax.grad(lambda p: loss(p, UNet3D(small, mm, remat=True))))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  f32 = UNet3D(small, mm).apply({"params": params}, sample, t[:1], ctx[:1])
  bf16 = UNet3D(small, mm, dtype=jnp.bfloat16).apply({"params": params}, sample, t[:1], ctx[:1])
  assert bf16.dtype == jnp.bfloat16
  assert rel_err(np.asarray(bf16, np.float32), f32) < 3e-2
