"""FreeNoise (Qiu et al. 2023, "Tuning-Free Longer Video Diffusion via Noise Rescheduling").

Longer videos than the motion module was trained on (16 frames), with two changes to sampling:

1. Noise rescheduling (`reschedule_noise`): the initial noise of frames L, L+1, ... is not drawn
   afresh but is a local shuffle of the noise L frames earlier. For each block start f in
   `range(L, N, S)` (L = context_length, S = context_stride), frames [f, f+S) get the noise of
   frames [f-L, f-L+S) in a random order. Blocks are filled in that order and read the already
   rescheduled frames, so the first L frames keep their own noise and every later frame repeats
   one of them. Any L consecutive frames starting at a multiple of S then hold the same L noise
   frames, reordered (when S divides L), which keeps the content of the long video coherent.
2. Windowed temporal attention (`UNet3D(..., free_noise=cfg)`, applied in the motion module's
   transformer blocks): with N > L frames, the attention blocks of every motion-module
   transformer block run on windows of L frames (`motion_windows`), each on its own: LayerNorm,
   positional encoding restarting at 0 in each window, attention, residual, per attention block.
   Each frame is then the weighted mean over the windows that hold it (`window_weights`,
   pyramid by default), and the feed-forward runs once on the fused frames. The windows run
   stacked, as extra batch rows. Spatial layers still see all N frames at once: FreeNoise alone
   does not bound memory (whole-UNet context windows, `adiff_jax.context`, do). N <= L frames:
   exactly the plain model.

Reference: the official implementation, github.com/arthur-qiu/FreeNoise-AnimateDiff
(`animatediff/pipelines/pipeline_animation.py` `prepare_latents(use_freenoise=True)` and
`animatediff/models/motion_module.py` `TemporalTransformerBlock(local_window=True)`, read at
e01d822). It hard-codes L = 16 and S = 4 and pyramid weights; here they are options.

Where this module differs from the official code and from diffusers
(`pipelines/free_noise_utils.py` `_prepare_latents_free_noise` and `models/attention.py`
`FreeNoiseTransformerBlock`, read in 0.42.1); elsewhere the three agree (tests/test_free_noise.py):

- Tail window. The official windows start at `range(0, N-L+1, S)` only: when (N-L) % S != 0 the
  last frames lie in no window, their fused attention output is 0 (`where(count > 0, value /
  count, value)`): the residual stream of those frames is lost and they leave the block as
  FF(LayerNorm(0)), the same vector at every spatial position. diffusers adds the window
  (N-L, N) but takes from it only the frames no other window holds, weighting their values with
  `weights[-r:]` and their count with the single scalar `weights[-r]`, so they come out scaled by
  w[j]/w[L-r] (with pyramid weights, L=16, S=4, N=26: the last frame x0.5). Here the tail window
  (N-L, N) is added and fused like any other window: every frame is sum(w*h) / sum(w) over all
  windows that hold it, the tail window included.
- Last noise block. When (N-L) % S != 0 the last block [f, N) has r < S frames. The official
  code raises there (it assigns S shuffled frames to r slots). diffusers takes the first r entries
  of a permutation of all S frames of [f-L, f-L+S), which can repeat a noise frame inside the tail
  window (N-L, N). Here those r frames are a permutation of [f-L, f-L+r): the tail window then
  holds the noise of the window (f-L, f), reordered, like every other window (with S dividing L:
  the first L frames' noise, no frame twice).
- Short videos. The official windowed block with N < L has no window at all (every attention
  output 0); diffusers fails for N < L (IndexError: its window list is empty). Here N <= L is
  the plain model, bit for bit.
- Permutations. The official draws them with Python's `random.shuffle`, diffusers with
  `torch.randperm`; here each block's permutation is `jax.random.permutation` of a key folded in
  from `key` and the block's first frame (`block_permutations`), so it does not depend on N. As
  in both, one permutation serves every sample of the batch and every channel.
- Options. diffusers' `noise_type="repeat_context"` compares the int context_length with a string
  and behaves as "random"; the official has no such option. Here `shuffle=False` is "random"
  (plain i.i.d. noise, windows only); there is no repeat mode. diffusers' third weighting,
  "delayed_reverse_sawtooth", is not in the paper or the official code and is not offered.
- Motion-module GroupNorm. diffusers normalises it over all N frames of the long video; the
  official (and this project) per frame. Not FreeNoise-specific (see docs/model.md), but with
  FreeNoise it makes diffusers' result depend on frames outside each window.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from adiff_jax.errors import InputError

WEIGHTINGS = ("pyramid", "flat")


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class FreeNoiseConfig:
  """FreeNoise settings; defaults are the official ones (16-frame windows, stride 4, pyramid).

  context_length: L, the frames one motion-module window holds (at most the motion module's
    positional-encoding length; the official 16, what the motion modules were trained on).
  context_stride: S, frames between window starts, and the size of a noise-rescheduling block
    (1 <= S <= L).
  weighting: how overlapping windows are fused per frame: "pyramid" (1, 2, ..., L/2, L/2, ..., 1,
    the official) or "flat" (plain mean).
  shuffle: reschedule the initial noise (`reschedule_noise`); False keeps i.i.d. noise and only
    windows the temporal attention.
  """
  context_length: int = 16
  context_stride: int = 4
  weighting: str = "pyramid"
  shuffle: bool = True

  def __post_init__(self):
    if not _is_int(self.context_length) or self.context_length < 1:
      raise InputError(f"FreeNoise context_length must be an integer >= 1, got {self.context_length!r}")
    if not _is_int(self.context_stride) or not 1 <= self.context_stride <= self.context_length:
      raise InputError(f"FreeNoise context_stride must be an integer in [1, context_length="
                       f"{self.context_length}], got {self.context_stride!r}")
    if self.weighting not in WEIGHTINGS:
      raise InputError(f"unknown FreeNoise weighting {self.weighting!r}; expected one of {WEIGHTINGS}")
    if not isinstance(self.shuffle, (bool, np.bool_)):
      raise InputError(f"FreeNoise shuffle must be True or False, got {self.shuffle!r}")


def _frames(num_frames) -> int:
  n = operator.index(num_frames)
  if n < 1:
    raise InputError(f"num_frames must be >= 1, got {n}")
  return n


# ---------------------------------------------------------------------------------------------
# Windows inside the motion module


def motion_windows(num_frames: int, cfg: FreeNoiseConfig) -> List[Tuple[int, int]]:
  """The (start, end) frame ranges the motion-module attention runs on.

  N <= L: one window, all frames (the plain model). Otherwise (t, t+L) for t in
  range(0, N-L+1, S), plus the tail window (N-L, N) when those leave frames uncovered.
  """
  n, length = _frames(num_frames), cfg.context_length
  if n <= length:
    return [(0, n)]
  wins = [(t, t + length) for t in range(0, n - length + 1, cfg.context_stride)]
  if wins[-1][1] < n:
    wins.append((n - length, n))
  return wins


def window_weights(cfg: FreeNoiseConfig) -> np.ndarray:
  """Fusion weight of each position in a window, (L,) float32: pyramid 1, 2, ..., peak, ..., 2, 1
  (even L: the peak L/2 twice; odd: (L+1)/2 once; as the official `generate_weight_sequence`),
  or flat ones."""
  length = cfg.context_length
  if cfg.weighting == "flat":
    return np.ones((length,), np.float32)
  pos = np.arange(length)
  return np.minimum(pos + 1, length - pos).astype(np.float32)


def frame_weight_totals(num_frames: int, cfg: FreeNoiseConfig) -> np.ndarray:
  """Per frame, the sum of the weights of the windows that hold it, (N,) float32 (all > 0)."""
  w = window_weights(cfg)
  total = np.zeros((_frames(num_frames),), np.float32)
  for a, b in motion_windows(num_frames, cfg):
    total[a:b] += w[: b - a]
  return total


def stack_windows(x, cfg: FreeNoiseConfig):
  """(B, P, N, C) -> (B, P*W, L, C): the W windows of every position as extra rows (row p*W + k is
  window k of position p), for N > L."""
  b, p, n, c = x.shape
  wins = motion_windows(n, cfg)
  parts = jnp.stack([x[:, :, s:e] for s, e in wins], axis=2)      # (B, P, W, L, C)
  return parts.reshape(b, p * len(wins), cfg.context_length, c)


def fuse_windows(h, num_frames: int, cfg: FreeNoiseConfig):
  """Inverse of `stack_windows`: (B, P*W, L, C) -> (B, P, N, C), each frame the weighted mean
  over the windows that hold it (accumulated in float32; result in h's dtype)."""
  wins = motion_windows(num_frames, cfg)
  b, pw, length, c = h.shape
  p = pw // len(wins)
  h = h.reshape(b, p, len(wins), length, c)
  w = jnp.asarray(window_weights(cfg))[:, None]                         # (L, 1)
  acc = jnp.zeros((b, p, num_frames, c), jnp.float32)
  for k, (s, e) in enumerate(wins):   # static slices: no scatter, a fixed summation order
    acc = acc.at[:, :, s:e].add(h[:, :, k].astype(jnp.float32) * w)
  total = jnp.asarray(frame_weight_totals(num_frames, cfg))[:, None]  # (N, 1)
  return (acc / total).astype(h.dtype)


# ---------------------------------------------------------------------------------------------
# Noise rescheduling


def shuffle_blocks(num_frames: int, cfg: FreeNoiseConfig) -> List[Tuple[int, int, int]]:
  """The rescheduled blocks, in the order they are filled: (first frame f, source frame f - L,
  length). f runs over range(L, N, S); every block has S frames except possibly the last."""
  n, length, stride = _frames(num_frames), cfg.context_length, cfg.context_stride
  return [(f, f - length, min(stride, n - f)) for f in range(length, n, stride)]


def block_permutations(key, num_frames: int, cfg: FreeNoiseConfig) -> List[jax.Array]:
  """One permutation of range(length) per block of `shuffle_blocks`: jax.random.permutation with
  the key `fold_in(key, f)` of the block's first frame f (the same for any num_frames)."""
  return [jax.random.permutation(jax.random.fold_in(key, f), n)
          for f, _, n in shuffle_blocks(num_frames, cfg)]


def noise_source_frames(key, num_frames: int, cfg: FreeNoiseConfig) -> jax.Array:
  """(N,) int32: rescheduled frame i takes the noise of original frame src[i].

  Block (f, f-L, n) with permutation p: src[f + j] = src[f - L + p[j]], blocks in order (so a
  block copies the already rescheduled frames L earlier, as the official in-place loop does).
  """
  src = jnp.arange(_frames(num_frames), dtype=jnp.int32)
  for (f, s, n), perm in zip(shuffle_blocks(num_frames, cfg), block_permutations(key, num_frames, cfg)):
    src = src.at[f:f + n].set(src[s:s + n][perm])
  return src


def reschedule_noise(noise, cfg: FreeNoiseConfig, key):
  """FreeNoise noise rescheduling of initial latents `noise` (B, F, h, w, C) (frames on axis 1).

  key: PRNG key of the permutations (take one not used to draw `noise`). Returns `noise` itself
  when cfg.shuffle is False or F <= context_length; otherwise noise[:, noise_source_frames(...)].
  Works under jit, with a traced key.
  """
  if jnp.ndim(noise) < 2:
    raise InputError(f"noise must be (B, F, ...) with frames on axis 1, got shape {jnp.shape(noise)}")
  num_frames = jnp.shape(noise)[1]
  if not cfg.shuffle or num_frames <= cfg.context_length:
    return noise
  return jnp.take(noise, noise_source_frames(key, num_frames, cfg), axis=1)
