"""Whole-UNet context windows for long videos (ComfyUI-AnimateDiff-Evolved semantics).

A video longer than the motion module's window is denoised as overlapping windows of
`context_length` frames: at every denoising step the UNet runs once per window, and each
frame's noise prediction is the weighted mean of the predictions of the windows that hold it.

Schedules (`windows`) are plain Python/numpy and depend only on (num_frames, step, config), so
they are static under `jax.jit`; `plan_windows` turns all steps' windows into arrays a jitted
loop indexes with the (traced) step. Fusion (`windowed_eps`, `fused_eps`) is JAX.

Schedules, as in AnimateDiff-Evolved `animatediff/context.py`:
- "uniform": Comfy's "standard_uniform". Windows of `L` frames start `L - overlap` apart,
  beginning at an offset that moves with the step (`_ordered_halving`); with `stride > 1`,
  dilated windows (every 2nd, 4th, ... frame) are added. A window that would wrap past the
  last frame is slid back to end at the last frame; a plain window from the wrapped-to frame is
  added when the following window misses it; repeated windows are dropped.
- "looped": Comfy's "looped_uniform". The same windows, left wrapped around the end
  (frame N-1 is followed by frame 0). `closed_loop` adds the windows that start in the last
  `overlap` frames, so the seam N-1 -> 0 is denoised like any other overlap.
- "static": Comfy's "standard_static". Windows at 0, d, 2d, ... (d = L - overlap), the last
  one slid back to end at frame N-1; the same for every step; `stride` is not used.

Two deliberate differences, both where Comfy's own windows are broken (elsewhere the two agree):
- Comfy lets a dilated window span more than N frames (levels up to 2^ceil(log2(N/L))), which
  repeats or reorders frames inside a window ("looped") or yields indices >= N ("uniform"). Here a
  dilation level is used only while its span (L-1)*s+1 fits in N frames.
- Comfy's "uniform" with stride > 1 can leave frames in no window; here each such frame gets a
  plain window, appended (see `_uniform_standard`).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, List

import jax
import jax.numpy as jnp
import numpy as np

from adiff_jax.errors import InputError

SCHEDULES = ("uniform", "static", "looped")
FUSE_METHODS = ("pyramid", "flat")


@dataclasses.dataclass(frozen=True)
class ContextConfig:
  """Context-window settings; defaults are AnimateDiff-Evolved's (16 frames, overlap 4)."""
  context_length: int = 16
  overlap: int = 4
  stride: int = 1        # dilation levels for "uniform"/"looped": 1, 2, 4, ... 2**(stride-1)
  schedule: str = "uniform"
  closed_loop: bool = False  # "looped" only (Comfy's standard uniform has no such option)
  fuse: str = "pyramid"

  def __post_init__(self):
    if self.context_length < 1:
      raise InputError(f"context_length must be >= 1, got {self.context_length}")
    if not 0 <= self.overlap < self.context_length:
      raise InputError(f"overlap must be in [0, context_length={self.context_length}), "
                       f"got {self.overlap}")
    if self.stride < 1:
      raise InputError(f"stride must be >= 1, got {self.stride}")
    if self.schedule not in SCHEDULES:
      raise InputError(f"unknown context schedule {self.schedule!r}; expected one of {SCHEDULES}")
    if self.fuse not in FUSE_METHODS:
      raise InputError(f"unknown fuse method {self.fuse!r}; expected one of {FUSE_METHODS}")
    if self.closed_loop and self.schedule != "looped":
      raise InputError(f"closed_loop needs schedule='looped', got {self.schedule!r}")


def _ordered_halving(step: int) -> float:
  """step's 64 bits reversed, over 2**64: 0, 1/2, 1/4, 3/4, 1/8, 5/8, ... for steps 0, 1, 2, ..."""
  rev = int(format(step, "064b")[::-1], 2)
  return rev / (1 << 64)


def _dilation_levels(num_frames: int, cfg: ContextConfig) -> List[int]:
  """Dilations 1, 2, 4, ...: at most `stride` of them, at most 1 + ceil(log2(N/L)) (as Comfy),
  and only those whose window span fits in the video (see module docstring)."""
  length = cfg.context_length
  # ceil(log2(N / L)) in integers: the smallest k with L * 2**k >= N (N > L here).
  k = 0
  while length << k < num_frames:
    k += 1
  levels = []
  for i in range(min(cfg.stride, k + 1)):
    s = 1 << i
    if (length - 1) * s + 1 > num_frames:
      break
    levels.append(s)
  return levels


def _raw_uniform(num_frames: int, step: int, cfg: ContextConfig, end_extra: int) -> List[List[int]]:
  """Uniform windows, wrapped modulo N; the starts run up to N + pad + end_extra (exclusive)."""
  oh = _ordered_halving(step)
  # Python's round() rounds halves to even (e.g. 12.5 -> 12), as Comfy's does.
  pad = int(round(num_frames * oh))
  out = []
  for s in _dilation_levels(num_frames, cfg):
    hop = cfg.context_length * s - cfg.overlap
    for j in range(int(oh * s) + pad, num_frames + pad + end_extra, hop):
      out.append([(j + s * i) % num_frames for i in range(cfg.context_length)])
  return out


def _wrap_index(window: List[int]) -> int:
  """Position of the first frame smaller than the one before it (where it wrapped), or -1."""
  for i in range(1, len(window)):
    if window[i] < window[i - 1]:
      return i
  return -1


def _uniform_standard(num_frames: int, step: int, cfg: ContextConfig) -> List[List[int]]:
  wins = _raw_uniform(num_frames, step, cfg, -cfg.overlap)
  i = 0
  # The list grows while it is walked (inserted windows are visited too), as in Comfy.
  while i < len(wins):
    w = wins[i]
    cut = _wrap_index(w)
    if cut >= 0:
      first_wrapped = w[cut]
      # Slide the window (same spacing) so that its last frame is N-1.
      rel = [(f - w[0]) % num_frames for f in w]
      wins[i] = [f + num_frames - 1 - rel[-1] for f in rel]
      # If the next window (cyclically) misses the frame it wrapped to, add a plain window there.
      if first_wrapped not in wins[(i + 1) % len(wins)]:
        wins.insert(i + 1, list(range(first_wrapped, first_wrapped + cfg.context_length)))
    i += 1
  # Keep the first copy of each window, in order.
  seen, out = set(), []
  for w in wins:
    if tuple(w) not in seen:
      seen.add(tuple(w))
      out.append(w)
  # Comfy's "next window holds the wrapped-to frame" test can be fooled by a dilated window that
  # is itself slid away afterwards, leaving frames in no window (Comfy then divides 0 by 0).
  # Not in Comfy: give each such frame a plain window starting there (or ending at N-1).
  covered = np.zeros((num_frames,), bool)
  for w in out:
    covered[w] = True
  for f in range(num_frames):
    if not covered[f]:
      start = min(f, num_frames - cfg.context_length)
      out.append(list(range(start, start + cfg.context_length)))
      covered[start:start + cfg.context_length] = True
  return out


def _static(num_frames: int, cfg: ContextConfig) -> List[List[int]]:
  length, d = cfg.context_length, cfg.context_length - cfg.overlap
  out = []
  for start in range(0, num_frames, d):
    if start + length >= num_frames:
      out.append(list(range(num_frames - length, num_frames)))
      break
    out.append(list(range(start, start + length)))
  return out


def windows(num_frames: int, step: int, cfg: ContextConfig) -> List[List[int]]:
  """Frame indices of each window at denoising step `step` (0, 1, 2, ...).

  Every window has `cfg.context_length` distinct frames in [0, num_frames); together they cover
  every frame. num_frames <= context_length gives one window of all frames.
  """
  num_frames, step = operator.index(num_frames), operator.index(step)
  if num_frames < 1:
    raise InputError(f"num_frames must be >= 1, got {num_frames}")
  if not 0 <= step < 1 << 64:
    raise InputError(f"step must be in [0, 2**64), got {step}")
  if num_frames <= cfg.context_length:
    return [list(range(num_frames))]
  if cfg.schedule == "static":
    return _static(num_frames, cfg)
  if cfg.schedule == "looped":
    return _raw_uniform(num_frames, step, cfg, 0 if cfg.closed_loop else -cfg.overlap)
  return _uniform_standard(num_frames, step, cfg)


def fusion_weights(length: int, fuse: str = "pyramid") -> np.ndarray:
  """Per-position weights of one window (float32, shape (length,)).

  pyramid: distance-from-the-edge ramp, 1, 2, ..., peak, ..., 2, 1 (even length: the peak L/2 twice;
  odd: the peak (L+1)/2 once). flat: all ones.
  """
  if fuse == "flat":
    return np.ones((length,), np.float32)
  if fuse != "pyramid":
    raise InputError(f"unknown fuse method {fuse!r}; expected one of {FUSE_METHODS}")
  pos = np.arange(length)
  return np.minimum(pos + 1, length - pos).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class WindowPlan:
  """Every step's windows as static arrays, so a jitted loop can pick them with a traced step.

  index (S, W, L) int32 frame indices; weight (S, W, L) float32 fusion weights; total (S, N) the
  per-frame sums of weights. Steps with fewer windows than W are padded with copies of their
  first window at weight 0, so W is a multiple of the windows computed per UNet call.
  """
  index: np.ndarray
  weight: np.ndarray
  total: np.ndarray

  @property
  def num_windows(self) -> int:
    return self.index.shape[1]


def _plan(num_frames: int, step: int, cfg: ContextConfig):
  """(windows as an int array (W, L), per-window weights (L,), per-frame weight totals (N,))."""
  idx = np.asarray(windows(num_frames, step, cfg), np.int32)
  w = fusion_weights(idx.shape[1], cfg.fuse)
  total = np.zeros((num_frames,), np.float32)
  np.add.at(total, idx, np.broadcast_to(w, idx.shape))
  return idx, w, total


def plan_windows(num_frames: int, num_steps: int, cfg: ContextConfig, group: int = 1) -> WindowPlan:
  """The windows of steps 0..num_steps-1, padded to a common count that `group` divides."""
  if group < 1:
    raise InputError(f"windows per UNet call must be >= 1, got {group}")
  plans = [_plan(num_frames, s, cfg) for s in range(num_steps)]
  n_win = max(p[0].shape[0] for p in plans)
  n_win = -(-n_win // group) * group
  length = plans[0][0].shape[1]
  index = np.zeros((num_steps, n_win, length), np.int32)
  weight = np.zeros((num_steps, n_win, length), np.float32)
  total = np.stack([p[2] for p in plans])
  for s, (idx, w, _) in enumerate(plans):
    index[s] = idx[0]                 # padding: the first window again, at weight 0
    index[s, :len(idx)] = idx
    weight[s, :len(idx)] = w
  return WindowPlan(index, weight, total)


def _bcast(v, ndim: int):
  """(F,) -> (1, F, 1, ...) with `ndim` axes in all."""
  return jnp.asarray(v).reshape((1, -1) + (1,) * (ndim - 2))


def _per_frame_context(context, num_frames: int) -> bool:
  return context is not None and context.ndim == 4 and context.shape[1] == num_frames


def windowed_eps(eps_fn: Callable[[Any, Any], Any], x, context, step: int, cfg: ContextConfig):
  """Noise prediction for a long video from `eps_fn` run on each context window: the plain
  per-window loop, for reading and testing (`fused_eps` is what sampling runs).

  x: (B, F, h, w, C) latents. context: a pytree (or None) of text states, each (B, 77, D) shared
  by all frames, or (B, F, 77, D) per frame (then sliced like x). eps_fn(x_win, ctx_win) ->
  (B, L, h, w, C'). Returns (B, F, h, w, C') with each frame the weighted mean over the windows
  that hold it. F <= context_length is exactly eps_fn(x, context).
  """
  num_frames = x.shape[1]
  if num_frames <= cfg.context_length:
    return eps_fn(x, context)
  idx, w, total = _plan(num_frames, step, cfg)
  acc, out_dtype = None, None
  for win in idx:
    ctx = jax.tree.map(lambda c: c[:, win] if _per_frame_context(c, num_frames) else c, context)
    eps = eps_fn(x[:, win], ctx)
    if acc is None:
      out_dtype = eps.dtype
      acc = jnp.zeros((eps.shape[0], num_frames) + eps.shape[2:], jnp.float32)
    acc = acc.at[:, win].add(eps.astype(jnp.float32) * _bcast(w, eps.ndim))
  return (acc / _bcast(total, acc.ndim)).astype(out_dtype)


def fused_eps(eps_fn: Callable[[Any, Any], Any], x, context, plan: WindowPlan, step,
              group: int = 1):
  """`windowed_eps` at step `step` (may be traced) of a `plan_windows` plan, `group` windows
  per eps_fn call.

  eps_fn sees (G*B, L, h, w, C) latents, window-major (row k*B + b: window k of sample b), with
  shared text repeated per window and per-frame text gathered like x; the leading axis is what
  a device mesh splits, so the windows of a call run in parallel. The calls run one after the
  other (`lax.scan`), so the UNet's activations are those of `group` windows, whatever F is.
  """
  num_frames, batch = x.shape[1], x.shape[0]
  n_win, length = plan.index.shape[1:]
  if n_win % group:
    raise InputError(f"the plan's {n_win} windows do not split into groups of {group}")
  idx = jnp.asarray(plan.index)[step].reshape(n_win // group, group, length)
  wts = jnp.asarray(plan.weight)[step].reshape(n_win // group, group, length)
  total = jnp.asarray(plan.total)[step]

  def stack(a, ix):  # (B, F, ...) -> (G*B, L, ...)
    g = jnp.moveaxis(a[:, ix], 1, 0)  # (G, B, L, ...)
    return g.reshape((group * batch, length) + a.shape[2:])

  def repeat(c):     # (B, ...) -> (G*B, ...)
    return jnp.broadcast_to(c[None], (group,) + c.shape).reshape((group * batch,) + c.shape[1:])

  def one_call(acc, ix_w):
    ix, w = ix_w
    ctx = jax.tree.map(lambda c: stack(c, ix) if _per_frame_context(c, num_frames) else repeat(c),
                       context)
    eps = eps_fn(stack(x, ix), ctx)                       # (G*B, L, ...)
    rest = eps.shape[2:]
    eps = eps.reshape((group, batch, length) + rest).astype(jnp.float32)
    eps = eps * w.reshape((group, 1, length) + (1,) * len(rest))
    eps = jnp.moveaxis(eps, 0, 1).reshape((batch, group * length) + rest)  # (B, G*L, ...)
    return acc.at[:, ix.reshape(-1)].add(eps)

  # The output's shape and dtype without running the model.
  out = jax.eval_shape(lambda: eps_fn(stack(x, idx[0]), jax.tree.map(
      lambda c: stack(c, idx[0]) if _per_frame_context(c, num_frames) else repeat(c), context)))
  acc = jnp.zeros((batch, num_frames) + out.shape[2:], jnp.float32)
  acc, _ = jax.lax.scan(lambda a, xs: (one_call(a, xs), None), acc, (idx, wts))
  return (acc / _bcast(total, acc.ndim)).astype(out.dtype)
