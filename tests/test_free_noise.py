"""FreeNoise: noise rescheduling against the official loop and diffusers, windowed motion modules
against diffusers' FreeNoiseTransformerBlock and an independent reference for the tail window."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.attention import FreeNoiseTransformerBlock
from diffusers.pipelines import free_noise_utils
from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin

from adiff_jax.context import ContextConfig
from adiff_jax.errors import InputError
from adiff_jax.free_noise import (FreeNoiseConfig, block_permutations, frame_weight_totals,
                                  motion_windows, noise_source_frames, reschedule_noise,
                                  shuffle_blocks, window_weights)
from adiff_jax.motion_module import MotionModuleConfig, TemporalTransformerBlock
from adiff_jax.params import random_init
from adiff_jax.unet import UNet3D, UNetConfig
from torch_ref import patch_motion_norms_per_frame, randomize_, unet_params_from_diffusers

KEY = jax.random.key(7)


# ---- noise rescheduling ------------------------------------------------------------------------

def official_reschedule(latents, perms, length, stride):
  """The official `prepare_latents(use_freenoise=True)` loop on (B, C, F, H, W), its
  `random.shuffle(list_index)` replaced by the given permutation of the block."""
  latents = latents.clone()
  for k, frame_index in enumerate(range(length, latents.shape[2], stride)):
    list_index = list(range(frame_index - length, frame_index + stride - length))
    list_index = [list_index[p] for p in perms[k]]
    latents[:, :, frame_index:frame_index + stride] = latents[:, :, list_index]
  return latents


def noise(b, f, seed=0):
  return np.random.default_rng(seed).standard_normal((b, f, 3, 2, 4)).astype(np.float32)


def to_torch(x):   # (B, F, h, w, C) -> (B, C, F, h, w)
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


def from_torch(t):
  return t.numpy().transpose(0, 2, 3, 4, 1)


@pytest.mark.parametrize("length,stride,frames", [(16, 4, 16 + 4 * 6), (16, 4, 20), (6, 4, 14),
                                                  (4, 1, 9), (5, 5, 15)])
def test_reschedule_equals_the_official_loop(length, stride, frames):
  cfg = FreeNoiseConfig(context_length=length, context_stride=stride)
  x = noise(2, frames)
  perms = [np.asarray(p) for p in block_permutations(KEY, frames, cfg)]
  assert len(perms) == len(range(length, frames, stride))
  want = from_torch(official_reschedule(to_torch(x), perms, length, stride))
  got = np.asarray(reschedule_noise(jnp.asarray(x), cfg, KEY))
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, x)
  # Under jit with a traced key: the same.
  jitted = jax.jit(lambda n, k: reschedule_noise(n, cfg, k))(jnp.asarray(x), KEY)
  np.testing.assert_array_equal(np.asarray(jitted), want)


def test_official_loop_fails_on_a_short_last_block():
  """(N-L) % S != 0: the official code assigns S shuffled frames to fewer slots and raises."""
  with pytest.raises(RuntimeError):
    official_reschedule(to_torch(noise(1, 18)), [np.arange(4)] * 1, 16, 4)


@pytest.mark.parametrize("length,stride,frames", [(16, 4, 40), (16, 4, 26), (6, 4, 13), (8, 3, 21)])
def test_reschedule_structure(length, stride, frames):
  cfg = FreeNoiseConfig(context_length=length, context_stride=stride)
  x = noise(1, frames, seed=3)
  got = np.asarray(reschedule_noise(x, cfg, KEY))
  np.testing.assert_array_equal(got[:, :length], x[:, :length])   # first L frames untouched
  frame = lambda i: got[0, i].tobytes()
  blocks = shuffle_blocks(frames, cfg)
  for f, src, n in blocks:
    assert src == f - length and n == min(stride, frames - f)
    # a permutation of the (already rescheduled) frames L earlier
    assert sorted(map(frame, range(f, f + n))) == sorted(map(frame, range(src, src + n)))
  # The tail window (N-L, N) holds the noise of the window (f-L, f) before the last block f,
  # reordered; with S | L, that is the first L frames' noise, none twice.
  f = blocks[-1][0]
  tail = sorted(map(frame, range(frames - length, frames)))
  assert tail == sorted(map(frame, range(f - length, f)))
  if length % stride == 0:
    assert tail == sorted(x[0, i].tobytes() for i in range(length))
  # Another key, other permutations; the source map is what was applied.
  src = np.asarray(noise_source_frames(KEY, frames, cfg))
  np.testing.assert_array_equal(got, x[:, src])
  other = np.asarray(noise_source_frames(jax.random.key(8), frames, cfg))
  assert not np.array_equal(src, other)


def test_reschedule_leaves_short_videos_and_shuffle_false_alone():
  x = jnp.asarray(noise(2, 16))
  assert reschedule_noise(x, FreeNoiseConfig(), KEY) is x
  y = jnp.asarray(noise(2, 24))
  assert reschedule_noise(y, FreeNoiseConfig(shuffle=False), KEY) is y
  with pytest.raises(InputError, match="frames on axis 1"):
    reschedule_noise(jnp.zeros((4,)), FreeNoiseConfig(), KEY)


class _FakeDraws:
  """Stand-ins for diffusers' random draws: `randn_tensor` returns the given latents and
  `torch.randperm` the given permutations, in order."""

  def __init__(self, latents, perms):
    self.latents, self.perms = latents, list(perms)

  def randn_tensor(self, shape, **_):
    assert tuple(shape) == tuple(self.latents.shape)
    return self.latents.clone()

  def randperm(self, n, **_):
    p = self.perms.pop(0)
    assert len(p) == n
    return torch.as_tensor(np.asarray(p), dtype=torch.long)


def diffusers_latents(monkeypatch, x, perms, length, stride, noise_type="shuffle_context"):
  draws = _FakeDraws(to_torch(x), perms)
  monkeypatch.setattr(free_noise_utils, "randn_tensor", draws.randn_tensor)
  monkeypatch.setattr(torch, "randperm", draws.randperm)
  host = types.SimpleNamespace(_free_noise_context_length=length, _free_noise_context_stride=stride,
                               _free_noise_noise_type=noise_type, vae_scale_factor=1)
  b, f, h, w, c = x.shape
  out = AnimateDiffFreeNoiseMixin._prepare_latents_free_noise(
      host, b, c, f, h, w, torch.float32, torch.device("cpu"), generator=None)
  assert not draws.perms, "every permutation used"
  return from_torch(out)


@pytest.mark.parametrize("length,stride,frames", [(16, 4, 32), (6, 4, 14), (16, 4, 26), (6, 4, 13),
                                                  (8, 3, 20)])
def test_reschedule_equals_diffusers(monkeypatch, length, stride, frames):
  """Full blocks: the same result given the same permutations. A short last block of r frames:
  ours permutes the r frames L earlier; diffusers takes the first r of a permutation of all S,
  so ours is what diffusers gives when its draw keeps those r frames first."""
  cfg = FreeNoiseConfig(context_length=length, context_stride=stride)
  x = noise(2, frames, seed=1)
  perms = [np.asarray(p) for p in block_permutations(KEY, frames, cfg)]
  drawn = [np.concatenate([p, np.arange(len(p), stride)]) for p in perms]
  want = diffusers_latents(monkeypatch, x, drawn, length, stride)
  np.testing.assert_array_equal(np.asarray(reschedule_noise(x, cfg, KEY)), want)


def test_diffusers_short_last_block_can_repeat_noise_in_the_tail_window(monkeypatch):
  """N=26, L=16, S=4: the last block is frames 24, 25. A diffusers draw that takes frames 11, 10
  of the block 8..11 puts noise into the tail window (10, 26) that it already holds."""
  length, stride, frames = 16, 4, 26
  x = noise(1, frames, seed=2)
  drawn = [np.arange(stride)] * 2 + [np.array([3, 2, 1, 0])]
  got = diffusers_latents(monkeypatch, x, drawn, length, stride)
  tail = [got[0, i].tobytes() for i in range(frames - length, frames)]
  assert len(set(tail)) < length
  ours = np.asarray(reschedule_noise(x, FreeNoiseConfig(), KEY))
  assert len({ours[0, i].tobytes() for i in range(frames - length, frames)}) == length


def test_diffusers_repeat_context_behaves_as_random(monkeypatch):
  """diffusers compares the int context_length with "repeat_context": the noise comes back as
  drawn (i.i.d. over all frames), not repeated. Our shuffle=False is that "random" mode."""
  x = noise(1, 40, seed=4)
  got = diffusers_latents(monkeypatch, x, [], 16, 4, noise_type="repeat_context")
  np.testing.assert_array_equal(got, x)
  assert not np.array_equal(got[:, 16:32], got[:, :16])


# ---- windows and weights -----------------------------------------------------------------------

def test_motion_windows_tables():
  fn = lambda length, stride: FreeNoiseConfig(context_length=length, context_stride=stride)
  assert motion_windows(8, fn(4, 2)) == [(0, 4), (2, 6), (4, 8)]
  assert motion_windows(9, fn(4, 2)) == [(0, 4), (2, 6), (4, 8), (5, 9)]       # + tail window
  assert motion_windows(26, fn(16, 4)) == [(0, 16), (4, 20), (8, 24), (10, 26)]
  assert motion_windows(64, fn(16, 4)) == [(t, t + 16) for t in range(0, 49, 4)]
  assert motion_windows(11, fn(6, 3)) == [(0, 6), (3, 9), (5, 11)]
  assert motion_windows(16, fn(16, 4)) == [(0, 16)]
  assert motion_windows(5, fn(16, 4)) == [(0, 5)]
  # Weights as the official generate_weight_sequence (pyramid) and diffusers' "flat".
  assert window_weights(fn(16, 4)).tolist() == list(range(1, 9)) + list(range(8, 0, -1))
  assert window_weights(fn(5, 1)).tolist() == [1, 2, 3, 2, 1]
  assert window_weights(FreeNoiseConfig(6, 3, "flat")).tolist() == [1] * 6
  np.testing.assert_array_equal(frame_weight_totals(9, fn(4, 2)), [1, 2, 3, 3, 3, 4, 4, 3, 1])


@pytest.mark.parametrize("kw,match", [
    (dict(context_length=0), "context_length"),
    (dict(context_length=2.5), "context_length"),
    (dict(context_length=True), "context_length"),
    (dict(context_stride=0), "context_stride"),
    (dict(context_length=8, context_stride=9), "context_stride"),
    (dict(weighting="delayed_reverse_sawtooth"), "weighting"),
    (dict(shuffle="yes"), "shuffle"),
])
def test_bad_configs(kw, match):
  with pytest.raises(InputError, match=match):
    FreeNoiseConfig(**kw)


# ---- the UNet against diffusers ----------------------------------------------------------------

TINY = dict(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=2,
            cross_attention_dim=32, norm_num_groups=8, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
OURS = UNetConfig.tiny()
MM = MotionModuleConfig.v2(num_heads=2, norm_groups=8)


def inputs(f, b=2, seed=0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((b, f, 8, 8, 4)).astype(np.float32)
  t = np.array([10.0, 731.0][:b], np.float32)
  ctx = rng.standard_normal((b, 7, 32)).astype(np.float32)
  return sample, t, ctx


def reference_unet(frames, seed=0):
  """Tiny diffusers UNetMotionModel (v2: mid-block motion module, pe 32) with random weights, its
  motion-module GroupNorm made per frame like the official; our params from it."""
  unet2d = randomize_(UNet2DConditionModel(**TINY), seed)
  adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2,
                          motion_mid_block_layers_per_block=1, motion_num_attention_heads=2,
                          motion_norm_num_groups=8, use_motion_mid_block=True, motion_max_seq_length=32)
  ref = randomize_(UNetMotionModel.from_unet2d(unet2d, adapter), seed + 1).eval()
  params = unet_params_from_diffusers(ref)
  patch_motion_norms_per_frame(ref, frames)
  return ref, params


def enable_diffusers_free_noise(ref, cfg: FreeNoiseConfig):
  """What AnimateDiffPipeline.enable_free_noise does to the UNet: every motion module's
  BasicTransformerBlock becomes a FreeNoiseTransformerBlock (same weights)."""
  host = types.SimpleNamespace(_free_noise_context_length=cfg.context_length,
                               _free_noise_context_stride=cfg.context_stride,
                               _free_noise_weighting_scheme=cfg.weighting,
                               device=torch.device("cpu"), dtype=torch.float32)
  blocks = [b for b in (*ref.down_blocks, ref.mid_block, *ref.up_blocks) if hasattr(b, "motion_modules")]
  for block in blocks:
    AnimateDiffFreeNoiseMixin._enable_free_noise_in_block(host, block)
  swapped = [t for b in blocks for m in b.motion_modules for t in m.transformer_blocks]
  assert len(swapped) == 11 and all(isinstance(t, FreeNoiseTransformerBlock) for t in swapped)
  return swapped


def run_reference(ref, sample, t, ctx):
  with torch.no_grad():
    f = sample.shape[1]
    x = torch.from_numpy(sample).permute(0, 4, 1, 2, 3)
    out = ref(x, torch.from_numpy(t), torch.from_numpy(np.repeat(ctx, f, axis=0))).sample
  return out.permute(0, 2, 3, 4, 1).numpy()


def max_abs(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("length,stride,frames,weighting", [(4, 2, 10, "pyramid"), (5, 3, 11, "flat")])
def test_unet_free_noise_matches_diffusers(length, stride, frames, weighting):
  """(N-L) % S == 0: no tail window, where diffusers and the official agree."""
  cfg = FreeNoiseConfig(context_length=length, context_stride=stride, weighting=weighting)
  assert motion_windows(frames, cfg)[-1][1] == frames and (frames - length) % stride == 0
  sample, t, ctx = inputs(frames)
  ref, params = reference_unet(frames)
  plain_want = run_reference(ref, sample, t, ctx)
  enable_diffusers_free_noise(ref, cfg)
  want = run_reference(ref, sample, t, ctx)
  got = UNet3D(OURS, MM, free_noise=cfg).apply({"params": params}, sample, t, ctx)
  err = max_abs(got, want)
  print(f"FreeNoise UNet L={length} S={stride} N={frames}: max |diff| {err:.2e}, "
        f"output scale {np.abs(want).max():.2f}")
  assert err < 1e-4
  # The windows matter: the plain model differs (and it is the plain diffusers model).
  plain = UNet3D(OURS, MM).apply({"params": params}, sample, t, ctx)
  assert max_abs(plain, plain_want) < 1e-4
  assert max_abs(plain, got) > 1e-2


def reference_block_forward(blk, hidden_states, encoder_hidden_states=None, **_):
  """Independent FreeNoise block with the tail window: every window (the regular ones and
  (N-L, N)) contributes to all its frames; each frame is sum(w * h) / sum(w)."""
  n, length, stride = hidden_states.shape[1], blk.context_length, blk.context_stride
  starts = list(range(0, n - length + 1, stride))
  if starts[-1] + length < n:
    starts.append(n - length)
  if blk.weighting_scheme == "flat":
    w = torch.ones(length)
  else:
    w = torch.tensor([float(min(i + 1, length - i)) for i in range(length)])
  num = torch.zeros_like(hidden_states)
  den = torch.zeros(n)
  for s in starts:
    h = hidden_states[:, s:s + length]
    h = blk.attn1(blk.pos_embed(blk.norm1(h))) + h
    h = blk.attn2(blk.pos_embed(blk.norm2(h))) + h
    num[:, s:s + length] += h * w[None, :, None]
    den[s:s + length] += w
  h = num / den[None, :, None]
  return blk.ff(blk.norm3(h)) + h


def test_tail_window_matches_independent_reference_not_diffusers():
  """(N-L) % S != 0 (L=6, S=3, N=11: windows (0,6), (3,9) and the tail (5,11)). Our UNet equals
  diffusers' model with its FreeNoise blocks' forward replaced by the independent reference
  above; stock diffusers (tail frames mis-normalised, tail window used for uncovered frames
  only) differs."""
  length, stride, frames = 6, 3, 11
  cfg = FreeNoiseConfig(context_length=length, context_stride=stride)
  sample, t, ctx = inputs(frames, seed=2)
  ref, params = reference_unet(frames, seed=3)
  blocks = enable_diffusers_free_noise(ref, cfg)
  stock = run_reference(ref, sample, t, ctx)
  for blk in blocks:
    blk.forward = types.MethodType(reference_block_forward, blk)
  want = run_reference(ref, sample, t, ctx)
  got = UNet3D(OURS, MM, free_noise=cfg).apply({"params": params}, sample, t, ctx)
  err = max_abs(got, want)
  print(f"tail window: max |diff| vs independent reference {err:.2e}; "
        f"vs stock diffusers {max_abs(got, stock):.2e}")
  assert err < 1e-4
  assert max_abs(got, stock) > 1e-2


def test_tail_window_in_one_block_and_the_diffusers_scale_error():
  """One motion-module transformer block (x (P, N, C)), L=6, S=3, N=11, pyramid weights
  1 2 3 3 2 1. Ours equals the independent reference; diffusers equals it before the tail window
  (frames < N-L) and, with the feed-forward zeroed (output = fused frames), gives the frames only
  the tail window holds as w[j] / w[L-r] times the right value: frame 9 x 2/2, frame 10 x 1/2."""
  length, stride, frames = 6, 3, 11
  cfg = FreeNoiseConfig(context_length=length, context_stride=stride)
  ref, params = reference_unet(frames, seed=4)
  blk = enable_diffusers_free_noise(ref, cfg)[0]      # down_blocks.0.motion_modules.0, 32 channels
  p = params["down_blocks_0"]["motion_modules_0"]["temporal_transformer"]["transformer_blocks_0"]
  x = np.random.default_rng(5).standard_normal((12, frames, 32)).astype(np.float32)
  ours = lambda p: np.asarray(TemporalTransformerBlock(MM, free_noise=cfg).apply({"params": p}, x[None]))[0]
  with torch.no_grad():
    want = reference_block_forward(blk, torch.from_numpy(x)).numpy()
    stock = blk(torch.from_numpy(x)).numpy()
  assert max_abs(ours(p), want) < 2e-5
  assert max_abs(stock[:, :frames - length], want[:, :frames - length]) < 2e-5
  assert max_abs(stock[:, frames - length:], want[:, frames - length:]) > 1e-2
  with torch.no_grad():
    blk.ff.net[2].weight.zero_()
    blk.ff.net[2].bias.zero_()
    want = reference_block_forward(blk, torch.from_numpy(x)).numpy()
    stock = blk(torch.from_numpy(x)).numpy()
  p0 = jax.tree.map(lambda v: v, p)
  p0["ff"]["net_2"] = jax.tree.map(np.zeros_like, p["ff"]["net_2"])
  np.testing.assert_allclose(ours(p0), want, atol=2e-5)
  np.testing.assert_allclose(stock[:, 9], want[:, 9], atol=2e-5)
  np.testing.assert_allclose(stock[:, 10], 0.5 * want[:, 10], atol=2e-5)


@pytest.mark.parametrize("frames", [4, 6])
def test_short_videos_equal_the_plain_unet_exactly(frames):
  cfg = FreeNoiseConfig(context_length=6, context_stride=2)
  sample, t, ctx = inputs(frames)
  plain = UNet3D(OURS, MM)
  rng = np.random.default_rng(5)
  params = jax.tree.map(lambda v: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32),
                        random_init(plain, sample, t, ctx))
  a = plain.apply({"params": params}, sample, t, ctx)
  b = UNet3D(OURS, MM, free_noise=cfg).apply({"params": params}, sample, t, ctx)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unet_frame_limits_with_free_noise():
  """With FreeNoise the windows, not the video, must fit the positional encoding (32 here)."""
  def shape_check(frames, free_noise):
    model = UNet3D(OURS, MM, free_noise=free_noise)
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, frames, 8, 8, 4), (1,), (1, 7, 32))]
    return jax.eval_shape(model.init, jax.random.key(0), *args)

  shape_check(40, FreeNoiseConfig())                                   # 40 frames, 16-frame windows
  with pytest.raises(InputError, match="positional encoding"):
    shape_check(40, None)
  with pytest.raises(InputError, match="context_length 36"):
    shape_check(40, FreeNoiseConfig(context_length=36))
  with pytest.raises(InputError, match="positional encoding"):
    shape_check(34, FreeNoiseConfig(context_length=36))                 # one window: plain
  with pytest.raises(InputError, match="FreeNoiseConfig"):
    shape_check(20, ContextConfig())
