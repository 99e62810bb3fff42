"""Training-objective options: Min-SNR-gamma and v-space loss weighting (vs diffusers'
compute_snr / alphas_cumprod), offset noise (per sample and channel, shared over frames and pixels) and the cosine learning rate
(hand-computed values)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from adiff_jax import schedulers
from adiff_jax.train import step as step_lib
from adiff_jax.train.config import OptimConfig, load_config
from adiff_jax.train.state import learning_rate, load_base, model_tree, resolve_optim

OFFICIAL_DDPM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear")


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weight_matches_diffusers(gamma):
  t = torch.tensor([0, 1, 50, 250, 500, 750, 999])
  snr = compute_snr(DDPMScheduler(**OFFICIAL_DDPM), t).double().numpy()
  want = np.minimum(snr, gamma) / snr                     # epsilon targets (diffusers' snr_gamma)
  got = schedulers.min_snr_weight(schedulers.NoiseSchedule.animatediff(), jnp.asarray(t.numpy()), gamma)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  assert want[-1] == 1.0 and want[0] < 0.01   # high noise kept, low noise down-weighted


def test_cosine_learning_rate_by_hand():
  o = resolve_optim(OptimConfig(learning_rate=1e-3, warmup_steps=10, schedule="cosine",
                                end_learning_rate=1e-4), total_steps=110)
  assert o.decay_steps == 100
  lr = learning_rate(o)
  # warm-up 0 -> 1e-3 linearly, then end + (peak - end) * (1 + cos(pi * k / 100)) / 2
  for s, want in [(0, 0.0), (5, 5e-4), (10, 1e-3), (60, 1e-4 + 9e-4 * 0.5), (110, 1e-4), (500, 1e-4)]:
    np.testing.assert_allclose(float(lr(s)), want, rtol=1e-5, atol=1e-9, err_msg=str(s))
  assert float(learning_rate(OptimConfig(learning_rate=3e-4))(123)) == pytest.approx(3e-4)
  with pytest.raises(ValueError, match="must exceed warmup_steps"):
    resolve_optim(OptimConfig(warmup_steps=100, schedule="cosine"), total_steps=50)
  with pytest.raises(ValueError, match="optim.schedule"):
    OptimConfig(schedule="linear")
  with pytest.raises(ValueError, match="optim.schedule"):
    load_config(None, ["optim.schedule=step"])


@pytest.fixture(scope="module")
def tiny_setup():
  cfg = load_config(None, [
      "model=tiny", "stage=motion_module", "dtype=f32", "steps=10",
      "model_overrides={unet: {layers_per_block: 1, block_out_channels: [32], cross_attention_levels: [true]}}"])
  tree = model_tree(cfg, load_base(cfg))
  rng = np.random.default_rng(0)
  batch = {"video": jnp.asarray(rng.uniform(-1, 1, (2, 3, 16, 16, 3)), jnp.float32),
           "ids": jnp.asarray(rng.integers(0, 1000, (2, 77)), jnp.int32)}
  return cfg, tree, batch


def _loss(cfg, tree, batch, monkeypatch, t, **opts):
  spec = step_lib.make_spec(dataclasses.replace(cfg, **opts), load_base(cfg).config)
  monkeypatch.setattr(step_lib.schedulers, "sample_timesteps", lambda key, b, n=1000, low=0: jnp.asarray(t))
  seen = {}
  add_noise = schedulers.add_noise

  def spy(schedule, x0, noise, tt):
    seen["noise"] = np.asarray(noise)
    return add_noise(schedule, x0, noise, tt)

  monkeypatch.setattr(step_lib.schedulers, "add_noise", spy)
  loss, aux = step_lib.diffusion_loss(spec, tree, batch, jax.random.key(3))
  return float(loss), aux, seen["noise"]


def test_snr_gamma_weights_the_loss_per_timestep(tiny_setup, monkeypatch):
  cfg, tree, batch = tiny_setup
  for tt in (20, 900):   # SNR above gamma (weight gamma/SNR) and below it (weight 1)
    t = np.array([tt, tt], np.int32)
    plain, _, _ = _loss(cfg, tree, batch, monkeypatch, t)           # same key: same noise
    weighted, aux, _ = _loss(cfg, tree, batch, monkeypatch, t, loss_weighting="min_snr", snr_gamma=5.0)
    snr = float(compute_snr(DDPMScheduler(**OFFICIAL_DDPM), torch.tensor([tt]))[0])
    np.testing.assert_allclose(weighted, min(snr, 5.0) / snr * plain, rtol=1e-4)
    np.testing.assert_allclose(float(aux["mse"]), plain, rtol=1e-5)
    # v space: the eps error / sqrt(acp_t), squared.
    v, _, _ = _loss(cfg, tree, batch, monkeypatch, t, loss_weighting="v")
    acp = float(DDPMScheduler(**OFFICIAL_DDPM).alphas_cumprod[tt])
    np.testing.assert_allclose(v, plain / acp, rtol=1e-4)
  # Mixed timesteps; gamma above every SNR: all weights 1, the plain MSE.
  t = np.array([20, 900], np.int32)
  plain, _, _ = _loss(cfg, tree, batch, monkeypatch, t)
  huge, _, _ = _loss(cfg, tree, batch, monkeypatch, t, loss_weighting="min_snr", snr_gamma=1e9)
  np.testing.assert_allclose(huge, plain, rtol=1e-5)
  with pytest.raises(ValueError, match="loss_weighting"):
    load_config(None, ["loss_weighting=x0"])
  with pytest.raises(ValueError, match="snr_gamma > 0"):
    load_config(None, ["loss_weighting=min_snr", "snr_gamma=0"])


def test_min_timestep():
  t = schedulers.sample_timesteps(jax.random.key(0), 4096, 1000, low=200)
  assert int(t.min()) >= 200 and int(t.max()) <= 999 and int(t.min()) < 210
  with pytest.raises(ValueError, match="lowest training timestep"):
    schedulers.sample_timesteps(jax.random.key(0), 4, 1000, low=1000)


def test_noise_offset_is_per_sample_channel_shared_over_frames(tiny_setup, monkeypatch):
  cfg, tree, batch = tiny_setup
  t = np.array([500, 500], np.int32)
  _, _, base = _loss(cfg, tree, batch, monkeypatch, t)
  _, _, off = _loss(cfg, tree, batch, monkeypatch, t, noise_offset=10.0)
  delta = off - base                                     # (B, F, h, w, C): the offset alone
  assert delta.shape == base.shape and delta.ndim == 5
  np.testing.assert_allclose(delta, np.broadcast_to(delta[:, :1, :1, :1, :], delta.shape), atol=1e-5)
  per = delta[:, 0, 0, 0, :]                             # (B, C) values ~ 10 * N(0, 1)
  assert np.all(np.abs(per) > 1e-3) and len(np.unique(np.round(per, 4))) == per.size
  assert 1.0 < np.std(per) < 40.0
