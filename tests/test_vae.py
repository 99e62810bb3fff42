"""AutoencoderKL parity with diffusers (random weights), video helpers, error paths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from adiff_jax.vae import (AutoencoderKL, DiagonalGaussian, VAEConfig, decode_video, encode_video,
                           scale_latents, unscale_latents)
from convert_weights.sd_base import tree_from_diffusers

diffusers = pytest.importorskip("diffusers")


def _torch_vae(cfg: VAEConfig):
  n = len(cfg.block_out_channels)
  vae = diffusers.AutoencoderKL(
      in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
      norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor).eval()
  # diffusers initialises norms to (1, 0) and many biases to 0: randomise them so a swapped
  # scale/bias or a missing bias cannot pass.
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif p.ndim == 1:  # norm weight
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  return vae


def _to_flax(state_dict) -> dict:
  """diffusers state dict -> our param tree, by the converter's mapping."""
  return {"params": jax.tree.map(jnp.asarray, tree_from_diffusers(state_dict, "vae"))}


# Jitted halves shared by all tests (model is static), so equal shapes compile once.
_encode = jax.jit(lambda model, p, x: model.apply(p, x, method=AutoencoderKL.encode), static_argnums=0)
_decode = jax.jit(lambda model, p, z: model.apply(p, z, method=AutoencoderKL.decode), static_argnums=0)


def _check_tree(model, params, x):
  want = jax.eval_shape(model.init, jax.random.key(0), x)
  got_s = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
  want_s = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), want)
  assert got_s == want_s


def _rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref))))


def _parity(cfg, shape):
  vae = _torch_vae(cfg)
  model = AutoencoderKL(cfg)
  params = _to_flax(vae.state_dict())
  x = np.random.uniform(-1, 1, shape).astype(np.float32)  # (N, H, W, C)
  _check_tree(model, params, jnp.asarray(x))
  with torch.no_grad():
    post = vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    ref_mean = post.mean.permute(0, 2, 3, 1).numpy()
    ref_logvar = post.logvar.permute(0, 2, 3, 1).numpy()
    z = np.random.randn(*ref_mean.shape).astype(np.float32)
    ref_img = vae.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  ours = _encode(model, params, x)
  img = _decode(model, params, z)
  assert isinstance(ours, DiagonalGaussian)
  assert ours.mean.shape == ref_mean.shape and img.shape == ref_img.shape
  errs = {"mean": _rel_err(ours.mean, ref_mean), "logvar": _rel_err(ours.logvar, ref_logvar),
          "decode": _rel_err(img, ref_img)}
  print("max abs error / max(1, output scale):", errs)
  # Measured (tiny, 3-level): ~1e-6 .. 5e-6 for all three in f32.
  assert all(e <= 1e-4 for e in errs.values()), errs


def test_parity_tiny():
  _parity(VAEConfig.tiny(), (2, 16, 24, 3))


def test_parity_three_levels():
  # Two downsamplers, layers_per_block 2, non-square input: catches H/W mixups, up-block order,
  # the asymmetric downsample padding and shortcut convs in both directions.
  cfg = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8)
  _parity(cfg, (1, 24, 16, 3))


@pytest.mark.slow
def test_parity_sd15_64px():
  _parity(VAEConfig.sd15(), (1, 64, 64, 3))


@pytest.fixture(scope="module")
def tiny():
  # Weights from a torch model: compiling `model.init` (hundreds of random initialisers) takes
  # ~15 s on CPU, converting a freshly initialised torch model is instant.
  torch.manual_seed(1)
  cfg = VAEConfig.tiny()
  return AutoencoderKL(cfg), _to_flax(_torch_vae(cfg).state_dict())


def test_video_helpers_match_per_frame(tiny):
  model, params = tiny
  cfg = model.config
  video = jax.random.uniform(jax.random.key(2), (2, 5, 8, 12, 3), minval=-1, maxval=1)
  frames = video.reshape((10, 8, 12, 3))
  post = _encode(model, params, frames)

  z = encode_video(model, params, video, chunk_size=3)  # 3 does not divide B*F = 10
  assert z.shape == (2, 5, 4, 6, 4)
  np.testing.assert_allclose(z.reshape(10, 4, 6, 4), scale_latents(post.mode(), cfg), atol=1e-5)

  zs = encode_video(model, params, video, key=jax.random.key(3), chunk_size=3)
  zs2 = encode_video(model, params, video, key=jax.random.key(3), chunk_size=64)  # one chunk
  np.testing.assert_allclose(zs, zs2, atol=1e-5)  # sample independent of chunking
  assert float(jnp.max(jnp.abs(zs - z))) > 1e-3  # and actually sampled

  out = decode_video(model, params, z, chunk_size=3)
  ref = _decode(model, params, unscale_latents(z.reshape(10, 4, 6, 4), cfg))
  assert out.shape == (2, 5, 8, 12, 3)
  np.testing.assert_allclose(out.reshape(10, 8, 12, 3), ref, atol=1e-5)


def test_posterior_and_scaling(tiny):
  model, params = tiny
  x = jnp.full((2, 16, 24, 3), 0.5)  # the shape of test_parity_tiny: reuses its compile
  post = _encode(model, params, x)
  assert float(post.logvar.min()) >= -30 and float(post.logvar.max()) <= 20
  s = post.sample(jax.random.key(0))
  assert s.shape == post.mean.shape and post.kl().shape == (2,)
  z = jnp.ones((2, 3))
  np.testing.assert_allclose(unscale_latents(scale_latents(z, model.config), model.config), z, rtol=1e-6)
  np.testing.assert_allclose(scale_latents(z, model.config), 0.18215 * z)
  # __call__ round trip (what init uses).
  assert jax.eval_shape(model.apply, params, x).shape == x.shape


def test_errors(tiny):
  model, params = tiny
  with pytest.raises(ValueError, match="rank 5"):
    encode_video(model, params, jnp.zeros((2, 8, 8, 3)))
  with pytest.raises(ValueError, match="3 channels"):
    encode_video(model, params, jnp.zeros((1, 2, 8, 8, 4)))
  with pytest.raises(ValueError, match="divisible by 2"):
    encode_video(model, params, jnp.zeros((1, 2, 8, 7, 3)))
  with pytest.raises(ValueError, match="rank 5"):
    decode_video(model, params, jnp.zeros((2, 4, 4, 4)))
  with pytest.raises(ValueError, match="4 channels"):
    decode_video(model, params, jnp.zeros((1, 2, 4, 4, 3)))
  with pytest.raises(ValueError, match="chunk_size"):
    decode_video(model, params, jnp.zeros((1, 2, 4, 4, 4)), chunk_size=0)
  with pytest.raises(ValueError, match="rank 4"):
    model.apply(params, jnp.zeros((8, 8, 3)), method=AutoencoderKL.encode)
  with pytest.raises(ValueError, match="4 channels"):
    model.apply(params, jnp.zeros((1, 4, 4, 8)), method=AutoencoderKL.decode)


def test_bf16_compute_f32_params(tiny):
  # Compute dtype is separate from parameter dtype: f32 params, bf16 activations.
  model, params = tiny
  m16 = AutoencoderKL(VAEConfig.tiny(), dtype=jnp.bfloat16)
  x = jax.random.uniform(jax.random.key(0), (1, 8, 8, 3), minval=-1, maxval=1)
  p16, p32 = _encode(m16, params, x), _encode(model, params, x)
  assert p16.mean.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(p16.mean, np.float32), p32.mean, atol=0.05)
  img16, img32 = _decode(m16, params, p32.mean), _decode(model, params, p32.mean)
  assert img16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(img16, np.float32), img32, atol=0.1)
