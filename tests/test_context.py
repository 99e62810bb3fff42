"""Context windows: hand-worked schedule tables, coverage, config errors, and fusion."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adiff_jax import context as ctxm
from adiff_jax.context import (ContextConfig, fused_eps, fusion_weights, plan_windows, windowed_eps,
                               windows)
from adiff_jax.errors import InputError


def span(a, b, s=1):
  """Frames a, a+s, ..., b (inclusive), for writing the tables below."""
  return list(range(a, b + 1, s))


def cfg(schedule="uniform", stride=1, closed_loop=False, fuse="pyramid", length=16, overlap=4):
  return ContextConfig(context_length=length, overlap=overlap, stride=stride, schedule=schedule,
                       closed_loop=closed_loop, fuse=fuse)


# ---- the step offset ---------------------------------------------------------------------------

def test_ordered_halving_first_steps():
  # Bit-reverse the step in 64 bits: 1 -> 0.1b, 2 -> 0.01b, 3 -> 0.11b, 4 -> 0.001b, ...
  got = [ctxm._ordered_halving(s) for s in range(8)]
  assert got == [0.0, 0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]


# ---- hand-worked tables ------------------------------------------------------------------------
# All with L = 16, overlap 4, so plain windows start 12 apart (hop = L*s - overlap = 12 for s = 1,
# 28 for s = 2). oh = ordered halving of the step; pad = round(N * oh) (halves to even);
# starts j = int(oh * s) + pad, j < N + pad - overlap (looped + closed loop: j < N + pad);
# window = (j + s*i) % N, i < 16. "uniform" then slides each wrapped window to end at N-1, adds
# [r, r+16) after it if the next window (cyclically) lacks the wrapped-to frame r, drops repeats.

UNIFORM_STRIDE1 = [
    # N=48, step 0: pad 0, starts 0 12 24 36; 36 wraps (36..47, 0..3) -> slid to 32..47;
    # next window (the first) holds frame 0, so nothing is added.
    (48, 0, [span(0, 15), span(12, 27), span(24, 39), span(32, 47)]),
    # step 1: oh 1/2, pad 24, starts 24 36 48 60 -> 24..39 | 36..3 (slid: 32..47) | 0..15 | 12..27.
    (48, 1, [span(24, 39), span(32, 47), span(0, 15), span(12, 27)]),
    # step 4: oh 1/8, pad 6, starts 6 18 30 42; 42 wraps (42..47, 0..9) -> 32..47, and the next
    # window (6..21) lacks frame 0 -> 0..15 inserted after it.
    (48, 4, [span(6, 21), span(18, 33), span(30, 45), span(32, 47), span(0, 15)]),
    # N=64, step 0: starts 0 12 24 36 48, none wraps (48 + 15 = 63).
    (64, 0, [span(0, 15), span(12, 27), span(24, 39), span(36, 51), span(48, 63)]),
    # step 1: pad 32, starts 32 44 56 68 80 -> 32..47 | 44..59 | 56..7 (slid: 48..63; next is
    # 4..19, no frame 0 -> insert 0..15) | 4..19 | 16..31.
    (64, 1, [span(32, 47), span(44, 59), span(48, 63), span(0, 15), span(4, 19), span(16, 31)]),
    # N=100, step 0: starts 0, 12, ..., 84 (84 + 15 = 99, no wrap).
    (100, 0, [span(j, j + 15) for j in range(0, 85, 12)]),
    # step 1: pad 50, starts 50 62 74 86 98 110 122 134. 86..1 slides to 84..99 (next, 98..13,
    # holds 0); 98..13 also slides to 84..99 (a repeat, dropped) and the next (10..25) lacks 0 ->
    # 0..15 inserted; 110 -> 10..25, 122 -> 22..37, 134 -> 34..49.
    (100, 1, [span(50, 65), span(62, 77), span(74, 89), span(84, 99), span(0, 15), span(10, 25),
              span(22, 37), span(34, 49)]),
    # step 4: N * oh = 12.5 rounds to 12 (half to even; 13 would give other windows). Starts 12,
    # 24, ..., 96; 96 wraps -> 84..99 (repeat of the 84 window, dropped); the next window
    # (cyclically the first, 12..27) lacks 0 -> 0..15 appended.
    (100, 4, [span(j, j + 15) for j in range(12, 85, 12)] + [span(0, 15)]),
]

UNIFORM_STRIDE2 = [
    # stride 2 adds dilation s = 2 (1 + ceil(log2(N/16)) >= 2 for all N here): span 31, hop 28.
    # N=48, step 0: plain as above; s=2 starts 0, 28: evens 0..30, and 28..46 + 0..10 (wraps
    # at frame 0) -> same spacing slid to end at 47: odds 17..47 (next window holds 0).
    (48, 0, [span(0, 15), span(12, 27), span(24, 39), span(32, 47), span(0, 30, 2), span(17, 47, 2)]),
    # step 1: s=2 starts int(0.5*2) + 24 = 25 and 53. 25..47 odd then 1, 3, 5, 7 (wraps at 1) ->
    # odds 17..47; the next window (53 % 48 = 5: odds 5..35) lacks frame 1 -> plain 1..16 inserted.
    (48, 1, [span(24, 39), span(32, 47), span(0, 15), span(12, 27), span(17, 47, 2), span(1, 16),
             span(5, 35, 2)]),
    # N=64, step 0: s=2 starts 0 28 56; 56 wraps (56..62, 0..22 evens) -> odds 33..63.
    (64, 0, [span(0, 15), span(12, 27), span(24, 39), span(36, 51), span(48, 63), span(0, 30, 2),
             span(28, 58, 2), span(33, 63, 2)]),
    # N=100, step 0: s=2 starts 0 28 56 84; 84 wraps -> odds 69..99.
    (100, 0, [span(j, j + 15) for j in range(0, 85, 12)]
     + [span(0, 30, 2), span(28, 58, 2), span(56, 86, 2), span(69, 99, 2)]),
    # Where Comfy leaves frames uncovered. N=37, step 2: oh 1/4, pad round(9.25) = 9.
    # s=1 starts 9 21 33: 9..24 | 21..36 | 33..11 -> slid 21..36 (a repeat); its next window is
    # s=2 from 9 (9..35 odd, 0, 2), which holds 0, so nothing is inserted; that one then slides to
    # evens 6..36, and s=2 from 37 is evens 0..30. Frames 1 3 5 7 are in no window: a plain
    # window from the first of them, 1..16, is added (our fix; Comfy would divide 0 by 0).
    (37, 2, [span(9, 24), span(21, 36), span(6, 36, 2), span(0, 30, 2), span(1, 16)]),
]

LOOPED = [
    # (N, step, closed_loop, stride, windows): wrapped windows are kept.
    # N=48: open stops starts at 48 - 4 = 44, closed at 48; both give 0 12 24 36.
    (48, 0, False, 1, [span(0, 15), span(12, 27), span(24, 39), span(36, 47) + span(0, 3)]),
    (48, 0, True, 1, [span(0, 15), span(12, 27), span(24, 39), span(36, 47) + span(0, 3)]),
    # N=64: open: 0..48; closed also 60 (60..63, 0..11).
    (64, 0, False, 1, [span(j, j + 15) for j in range(0, 49, 12)]),
    (64, 0, True, 1, [span(j, j + 15) for j in range(0, 49, 12)] + [span(60, 63) + span(0, 11)]),
    # step 1: pad 32, starts 32 44 56 68 80.
    (64, 1, False, 1, [span(32, 47), span(44, 59), span(56, 63) + span(0, 7), span(4, 19),
                       span(16, 31)]),
    # stride 2, closed: s=1 starts 0..60; s=2 starts 0 28 56 (56 + 28 >= 64).
    (64, 0, True, 2, [span(j, j + 15) for j in range(0, 49, 12)] + [span(60, 63) + span(0, 11)]
     + [span(0, 30, 2), span(28, 58, 2), span(56, 62, 2) + span(0, 22, 2)]),
    # N=100: open starts 0..84, closed adds 96 (96..99, 0..11).
    (100, 0, False, 1, [span(j, j + 15) for j in range(0, 85, 12)]),
    (100, 0, True, 1, [span(j, j + 15) for j in range(0, 85, 12)] + [span(96, 99) + span(0, 11)]),
    # step 1, closed: pad 50, starts 50, 62, ..., 146 (< 150).
    (100, 1, True, 1, [span(50, 65), span(62, 77), span(74, 89), span(86, 99) + span(0, 1),
                       span(98, 99) + span(0, 13), span(10, 25), span(22, 37), span(34, 49),
                       span(46, 61)]),
]

STATIC = [
    # Starts 0, 12, 24, ... until a window reaches the end; that one is slid back to end at N-1.
    (48, [span(0, 15), span(12, 27), span(24, 39), span(32, 47)]),  # 36 + 16 > 48 -> 32..47
    (50, [span(0, 15), span(12, 27), span(24, 39), span(34, 49)]),  # 36 + 16 > 50 -> 34..49
    (64, [span(j, j + 15) for j in range(0, 49, 12)]),              # 48 + 16 = 64 exactly
    (100, [span(j, j + 15) for j in range(0, 85, 12)]),             # 84 + 16 = 100 exactly
]


@pytest.mark.parametrize("n,step,expected", UNIFORM_STRIDE1)
def test_uniform_stride1_table(n, step, expected):
  assert windows(n, step, cfg("uniform", stride=1)) == expected


@pytest.mark.parametrize("n,step,expected", UNIFORM_STRIDE2)
def test_uniform_stride2_table(n, step, expected):
  assert windows(n, step, cfg("uniform", stride=2)) == expected


@pytest.mark.parametrize("n,step,closed,stride,expected", LOOPED)
def test_looped_table(n, step, closed, stride, expected):
  assert windows(n, step, cfg("looped", stride=stride, closed_loop=closed)) == expected


@pytest.mark.parametrize("n,expected", STATIC)
def test_static_table(n, expected):
  for step in (0, 1, 5, 37):  # the same windows at every step; stride is unused
    assert windows(n, step, cfg("static")) == expected
    assert windows(n, step, cfg("static", stride=3)) == expected


def test_uniform_shifts_with_step():
  c = cfg("uniform")
  sets = {step: sorted(map(tuple, windows(64, step, c))) for step in range(4)}
  assert sets[0] != sets[1]
  # stride 1 at N=48: steps 0..3 give offsets 0, 24, 12, 36 (multiples of the hop 12): same set.
  assert len({tuple(sorted(map(tuple, windows(48, s, c)))) for s in range(4)}) == 1


@pytest.mark.parametrize("schedule", ["uniform", "looped", "static"])
@pytest.mark.parametrize("n", [1, 5, 15, 16])
def test_short_video_is_one_window(schedule, n):
  for step in (0, 3):
    assert windows(n, step, cfg(schedule)) == [list(range(n))]


def test_dilation_never_repeats_frames():
  # Comfy would use s = 4 here (1 + ceil(log2(48/16)) = 3 levels), a span of 61 > 48 frames that
  # repeats frames in a window; only s = 1, 2 are used.
  for schedule in ("uniform", "looped"):
    got = windows(48, 0, cfg(schedule, stride=3))
    assert got == windows(48, 0, cfg(schedule, stride=2))


# ---- coverage ----------------------------------------------------------------------------------

def test_every_frame_covered():
  combos = 0
  for length, overlap, stride in [(16, 4, 1), (16, 4, 2), (16, 4, 3), (16, 0, 1), (16, 15, 2),
                                  (8, 2, 4), (5, 2, 2), (3, 1, 3), (2, 1, 2), (1, 0, 3)]:
    for schedule, closed in [("uniform", False), ("looped", False), ("looped", True),
                             ("static", False)]:
      c = cfg(schedule, stride=stride, closed_loop=closed, length=length, overlap=overlap)
      for n in itertools.chain(range(1, 70), (97, 100, 128, 200)):
        for step in (0, 1, 2, 3, 4, 5, 6, 7, 11, 20, 63, 1000):
          wins = windows(n, step, c)
          seen = np.zeros(n, int)
          for w in wins:
            assert len(w) == min(n, length) == len(set(w)), (c, n, step, w)
            assert all(0 <= f < n for f in w), (c, n, step, w)
            seen[w] += 1
          assert seen.min() >= 1, (c, n, step, np.flatnonzero(seen == 0))
          assert len(set(map(tuple, wins))) == len(wins) or schedule == "looped"
          combos += 1
  assert combos > 10000


# ---- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(overlap=16), dict(overlap=20), dict(overlap=-1), dict(context_length=0, overlap=0),
    dict(stride=0), dict(schedule="standard_uniform"), dict(schedule="batched"),
    dict(fuse="relative"), dict(fuse="gauss"), dict(schedule="uniform", closed_loop=True),
    dict(schedule="static", closed_loop=True),
])
def test_config_errors(kwargs):
  with pytest.raises(InputError):
    ContextConfig(**kwargs)


def test_config_defaults_and_frozen():
  c = ContextConfig()
  assert (c.context_length, c.overlap, c.stride, c.schedule, c.closed_loop, c.fuse) == (
      16, 4, 1, "uniform", False, "pyramid")
  ContextConfig(context_length=1, overlap=0)
  ContextConfig(schedule="looped", closed_loop=True)
  with pytest.raises(Exception):
    c.overlap = 2


def test_bad_step_or_frames():
  with pytest.raises(InputError):
    windows(40, -1, ContextConfig())
  with pytest.raises(InputError):
    windows(0, 0, ContextConfig())


# ---- fusion weights ----------------------------------------------------------------------------

def test_fusion_weights():
  np.testing.assert_array_equal(fusion_weights(16, "pyramid"),
                                [1, 2, 3, 4, 5, 6, 7, 8, 8, 7, 6, 5, 4, 3, 2, 1])
  np.testing.assert_array_equal(fusion_weights(5, "pyramid"), [1, 2, 3, 2, 1])
  np.testing.assert_array_equal(fusion_weights(4, "pyramid"), [1, 2, 2, 1])
  np.testing.assert_array_equal(fusion_weights(1, "pyramid"), [1])
  np.testing.assert_array_equal(fusion_weights(7, "flat"), np.ones(7))
  assert fusion_weights(16).dtype == np.float32
  with pytest.raises(InputError):
    fusion_weights(16, "relative")


# ---- fusion ------------------------------------------------------------------------------------

B, H, W, C, T, D = 2, 2, 3, 3, 5, 4  # batch, latent h/w/channels, text tokens, text width


def _inputs(n, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.randn(B, n, H, W, C).astype(np.float32)
  x[..., 0] = np.arange(n, dtype=np.float32)[None, :, None, None]  # channel 0 = frame index
  per_frame = rng.randn(B, n, T, D).astype(np.float32)
  text = rng.randn(B, T, D).astype(np.float32)
  return x, per_frame, text


def _toy_eps(xw, cw):
  """Per-sample, depends on the window's place: mean frame index (channel 0) scales the output."""
  xp = jnp if isinstance(xw, jax.Array) else np
  mean_idx = xw[..., 0].mean(axis=tuple(range(1, xw.ndim - 1)))  # (B,)
  scale = (1.0 + mean_idx / 10.0).reshape((-1,) + (1,) * (xw.ndim - 1))
  if cw.ndim == 4:  # per-frame context (B, L, T, D): a per-frame term
    c_term = cw.mean(axis=(2, 3))[:, :, None, None, None]
  else:             # text (B, T, D): a per-sample term
    c_term = cw.mean(axis=(1, 2))[:, None, None, None, None]
  return xp.sin(xw) * scale + c_term


def windowed_eps_batched(eps_fn, x, context, step, c, group=1):
  """fused_eps on a plan of steps 0..step (the pipeline's form), for one step."""
  n = x.shape[1]
  if n <= c.context_length:
    return eps_fn(x, context)
  return fused_eps(eps_fn, x, context, plan_windows(n, step + 1, c, group), step, group)


def _numpy_fused(x, context, wins, weights):
  """Straightforward reference: per frame, sum of weight * window output over sum of weights."""
  n = x.shape[1]
  num = np.zeros(x.shape, np.float64)
  den = np.zeros(n, np.float64)
  for win in wins:
    cw = context[:, win] if context.ndim == 4 else context
    out = np.asarray(_toy_eps(x[:, win], cw), np.float64)
    for p, f in enumerate(win):
      num[:, f] += weights[p] * out[:, p]
      den[f] += weights[p]
  return num / den[None, :, None, None, None]


PYRAMID16 = [1, 2, 3, 4, 5, 6, 7, 8, 8, 7, 6, 5, 4, 3, 2, 1]


@pytest.mark.parametrize("n,step,c", [
    (40, 0, cfg("uniform")), (40, 3, cfg("uniform")), (48, 1, cfg("uniform", stride=2)),
    (40, 1, cfg("looped", closed_loop=True)), (37, 0, cfg("static")),
    (40, 5, cfg("uniform", fuse="flat")),
])
@pytest.mark.parametrize("per_frame", [True, False])
def test_windowed_eps_matches_numpy(n, step, c, per_frame):
  x, pf, text = _inputs(n)
  context = pf if per_frame else text
  weights = PYRAMID16 if c.fuse == "pyramid" else [1] * 16
  want = _numpy_fused(x, context, windows(n, step, c), weights)
  got = windowed_eps(_toy_eps, jnp.asarray(x), jnp.asarray(context), step, c)
  assert got.shape == x.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  got_b = windowed_eps_batched(_toy_eps, jnp.asarray(x), jnp.asarray(context), step, c)
  np.testing.assert_allclose(np.asarray(got_b), np.asarray(got), rtol=1e-6, atol=1e-6)


def test_fusion_is_not_a_plain_mean():
  # Pyramid and flat weights must give different results where windows overlap; guards
  # against the weights being dropped.
  x, pf, _ = _inputs(40)
  a = windowed_eps(_toy_eps, jnp.asarray(x), jnp.asarray(pf), 0, cfg("uniform"))
  b = windowed_eps(_toy_eps, jnp.asarray(x), jnp.asarray(pf), 0, cfg("uniform", fuse="flat"))
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_batched_calls_eps_once_window_major():
  """All windows in one call (group = W): eps sees (W*B, L, ...) rows k*B + b (window k, sample
  b). The eps adds its row number, so the fused output tells which row held which frames."""
  x, pf, text = _inputs(40)
  c = cfg("uniform")
  wins = windows(40, 2, c)
  calls = []

  def eps(xw, cw):
    calls.append((xw.shape, cw.shape))
    rows = jnp.arange(xw.shape[0], dtype=xw.dtype).reshape((-1,) + (1,) * (xw.ndim - 1))
    return xw + rows

  got = windowed_eps_batched(eps, jnp.asarray(x), jnp.asarray(text), 2, c, group=len(wins))
  assert calls[-1] == ((len(wins) * B, 16, H, W, C), (len(wins) * B, T, D))
  num, den = np.zeros((B, 40)), np.zeros(40)
  for k, win in enumerate(wins):
    for p, f in enumerate(win):
      num[:, f] += PYRAMID16[p] * (k * B + np.arange(B))
      den[f] += PYRAMID16[p]
  want = x + (num / den)[:, :, None, None, None]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [1, 3, 4])
def test_grouped_windows_and_padding_equal_the_loop(group):
  """Windows per call (a plan padded with weight-0 windows to a multiple of the group) do not
  change the result; the plan holds every step's windows for a traced step."""
  x, pf, _ = _inputs(52)
  c = cfg("uniform", stride=2)
  plan = plan_windows(52, 6, c, group)
  assert plan.num_windows % group == 0
  f = jax.jit(lambda x, cc, s: fused_eps(_toy_eps, x, cc, plan, s, group))
  for step in (0, 3, 5):
    want = windowed_eps(_toy_eps, jnp.asarray(x), jnp.asarray(pf), step, c)
    got = f(jnp.asarray(x), jnp.asarray(pf), jnp.int32(step))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_context_pytree_is_sliced_per_leaf():
  """A (uncond, cond) pair, one per-frame and one shared, is sliced leaf by leaf."""
  x, pf, text = _inputs(40)
  c = cfg("static")
  pair_eps = lambda xw, cw: _toy_eps(xw, cw[0]) + _toy_eps(xw, cw[1])
  want = (windowed_eps(_toy_eps, jnp.asarray(x), jnp.asarray(pf), 0, c)
          + windowed_eps(_toy_eps, jnp.asarray(x), jnp.asarray(text), 0, c))
  got = windowed_eps_batched(pair_eps, jnp.asarray(x), (jnp.asarray(pf), jnp.asarray(text)), 0, c, 2)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [16, 9])
@pytest.mark.parametrize("fn", [windowed_eps, windowed_eps_batched])
def test_short_video_is_plain_eps(n, fn):
  x, pf, text = _inputs(n)
  for context in (pf, text):
    want = _toy_eps(jnp.asarray(x), jnp.asarray(context))
    got = fn(_toy_eps, jnp.asarray(x), jnp.asarray(context), 7, cfg("uniform"))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_identity_eps_gives_back_x_and_jit():
  # Any weighted mean of identical values is that value: eps = x must come back unchanged.
  x, pf, _ = _inputs(50)
  c = cfg("uniform", stride=2)
  ident = lambda xw, cw: xw
  np.testing.assert_allclose(np.asarray(windowed_eps(ident, jnp.asarray(x), None, 4, c)), x,
                             rtol=1e-6)
  f = jax.jit(lambda x, cc: windowed_eps_batched(_toy_eps, x, cc, 4, c))
  np.testing.assert_allclose(np.asarray(f(jnp.asarray(x), jnp.asarray(pf))),
                             np.asarray(windowed_eps(_toy_eps, jnp.asarray(x), jnp.asarray(pf), 4, c)),
                             rtol=1e-6, atol=1e-6)


def test_bf16_output_dtype():
  x, pf, _ = _inputs(40)
  xb = jnp.asarray(x, jnp.bfloat16)
  for fn in (windowed_eps, windowed_eps_batched):
    out = fn(lambda xw, cw: xw, xb, jnp.asarray(pf, jnp.bfloat16), 0, cfg("uniform"))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(xb, np.float32), rtol=1e-2)
