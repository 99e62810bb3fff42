"""Data pipeline: sampling rule, decoding, skipping, sharding, resume, TFDS round trip, synthetic."""
import csv
import dataclasses
import itertools

import numpy as np
import pytest

from adiff_jax.data import loader, synthetic, webvid
from adiff_jax.data.loader import ClipConfig, ClipTransform, clip_indices, make_train_loader

H, W = 48, 64


def moving_square(n, *, h=H, w=W):
  """Square sliding right one pixel per frame; its left edge encodes the frame index."""
  frames = np.full((n, h, w, 3), 30, np.uint8)
  for i in range(n):
    frames[i, 16:32, i:i + 12] = (230, 60, 60)
  return frames


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  webvid.write_video(str(d / "v0.mp4"), moving_square(30))
  webvid.write_video(str(d / "v1.mp4"), moving_square(24)[:, :, ::-1])
  webvid.write_video(str(d / "short.mp4"), moving_square(5))
  (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
  rows = [("v0", "a red square moving right", "p0"), ("v1", "a red square moving left", "p0"),
          ("short", "too short", "p1"), ("corrupt", "broken", "p1"), ("missing", "no file", "p1")]
  with open(d / "index.csv", "w", newline="") as f:
    wr = csv.writer(f)
    wr.writerow(["videoid", "name", "page_dir"])
    wr.writerows(rows)
  return d


def source(video_dir):
  return webvid.WebVidSource(str(video_dir / "index.csv"), str(video_dir))


# -- sampling rule -----------------------------------------------------------------------------

def test_clip_indices_match_official_rule():
  # n=30, stride 4, F=8: clip_length = min(30, 29) = 29, starts 0..1.
  assert clip_indices(30, 4, 8, 0.0).tolist() == np.linspace(0, 28, 8, dtype=int).tolist()
  assert clip_indices(30, 4, 8, 0.99).tolist() == np.linspace(1, 29, 8, dtype=int).tolist()
  # n=100, stride 3, F=16: clip_length 46, start = floor(0.5 * 55) = 27.
  assert clip_indices(100, 3, 16, 0.5).tolist() == list(range(27, 27 + 46, 3))
  # Shorter than the span: the whole video, frames repeat.
  assert clip_indices(5, 4, 8, 0.7).tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
  for u in np.linspace(0, 0.999, 50):
    idx = clip_indices(57, 2, 16, u)
    assert idx[0] >= 0 and idx[-1] <= 56 and len(idx) == 16


def test_read_video_frames_returns_requested_frames(video_dir):
  frames, n = webvid.read_video_frames(str(video_dir / "v0.mp4"), lambda n: np.array([0, 7, 7, 29]))
  assert n == 30 and frames.shape == (4, H, W, 3) and frames.dtype == np.uint8
  # Left edge of the red square is at x == frame index (lossy codec: threshold on red).
  left = [int(np.argmax(f[24, :, 0] > 128)) for f in frames]
  assert left == [0, 7, 7, 29]
  with pytest.raises(webvid.VideoTooShort):
    webvid.read_video_frames(str(video_dir / "short.mp4"), lambda n: np.arange(n), min_frames=8)


def test_transform_shapes_range_and_indices(video_dir):
  cfg = ClipConfig(sample_size=32, sample_stride=4, sample_n_frames=8, random_flip=False)
  tr = ClipTransform(cfg)
  ex = tr.apply(source(video_dir)[0], u_start=0.99, flip=False, drop_text=False)
  v = ex["video"]
  assert v.shape == (8, 32, 32, 3) and v.dtype == np.float32
  assert -1.0 <= v.min() and v.max() <= 1.0 and v.min() < -0.5 and v.max() > 0.5
  assert ex["text"] == "a red square moving right"
  # Frames must be linspace(1, 29, 8); 48x64 -> 32x42 (scale 2/3) then crop 5 px each side.
  expected = clip_indices(30, 4, 8, 0.99)
  # Identify each output frame by its nearest reference frame (the codec is lossy).
  refs = loader.to_model_range(loader.resize_center_crop(moving_square(30), (32, 32)))
  errs = np.abs(v[:, None] - refs[None]).mean(axis=(2, 3, 4))    # (8, 30)
  assert errs.argmin(axis=1).tolist() == expected.tolist() == [1, 5, 9, 13, 17, 21, 25, 29]


def test_flip_is_deterministic_per_seed_and_index(video_dir):
  cfg = ClipConfig(sample_size=32, sample_stride=2, sample_n_frames=4)
  tr = ClipTransform(cfg)
  rec = source(video_dir)[0]
  a = tr.random_map(rec, np.random.default_rng(5))
  b = tr.random_map(rec, np.random.default_rng(5))
  np.testing.assert_array_equal(a["video"], b["video"])
  u_start, u_flip, _ = np.random.default_rng(5).random(3)
  plain = tr.apply(rec, u_start=u_start, flip=False, drop_text=False)["video"]
  want = plain[:, :, ::-1] if u_flip < 0.5 else plain
  np.testing.assert_array_equal(a["video"], want)
  flipped = tr.apply(rec, u_start=u_start, flip=True, drop_text=True)
  np.testing.assert_array_equal(flipped["video"], plain[:, :, ::-1])
  assert flipped["text"] == ""


def test_single_frame_mode(video_dir):
  tr = ClipTransform(ClipConfig(sample_size=24, single_frame=True, random_flip=False))
  ex = tr.apply(source(video_dir)[2], u_start=0.5, flip=False, drop_text=False)
  assert ex["video"].shape == (1, 24, 24, 3)  # 5-frame video is long enough for one frame


def test_skips_are_counted_not_raised(video_dir):
  cfg = ClipConfig(sample_size=16, sample_stride=2, sample_n_frames=8)
  loader = make_train_loader(source(video_dir), batch_size=2, seed=0, shard_index=0,
                             shard_count=1, num_epochs=2, clip=cfg)
  it = iter(loader)
  batches = list(it)
  # 2 good videos x 2 epochs = 4 examples -> 2 batches; 3 bad records x 2 epochs skipped.
  assert len(batches) == 2
  assert batches[0]["video"].shape == (2, 8, 16, 16, 3)
  assert batches[0]["text"].shape == (2,)
  assert it.counts == {"ok": 4, "unreadable": 4, "too_short": 2}
  # min_frames=1 keeps the short video (frames repeat, as in the official loader).
  it = iter(make_train_loader(source(video_dir), batch_size=1, seed=0, shard_index=0,
                              shard_count=1, num_epochs=1, clip=dataclasses.replace(cfg, min_frames=1)))
  assert len(list(it)) == 3 and it.counts["too_short"] == 0


def test_all_bad_source_raises_after_limit(video_dir):
  src = [{"path": str(video_dir / "corrupt.mp4"), "text": "x"}] * 3
  it = iter(make_train_loader(src, batch_size=1, seed=0, shard_index=0, shard_count=1,
                              max_consecutive_skips=10))
  with pytest.raises(RuntimeError, match="consecutive"):
    next(it)


# -- loader: sharding, determinism, resume -----------------------------------------------------

class IndexSource:
  """In-memory clips whose pixel value encodes the record index."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"video": np.full((4, 8, 8, 3), i, np.uint8), "text": f"clip {i}"}


def _ids(batch):
  return [int(t.split()[1]) for t in batch["text"]]


def test_sharding_partitions_indices():
  cfg = ClipConfig(sample_size=8, sample_stride=1, sample_n_frames=4, random_flip=False)
  seen = []
  for shard in range(2):
    it = iter(make_train_loader(IndexSource(21), batch_size=5, seed=3, shard_index=shard,
                                shard_count=2, num_epochs=1, clip=cfg))
    seen.append([i for b in it for i in _ids(b)])
  assert len(seen[0]) == len(seen[1]) == 10
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(range(20))  # record 20 dropped: equal shard sizes
  assert set(seen[0]) == set(range(0, 20, 2))


def test_deterministic_and_reshuffled_per_epoch():
  cfg = ClipConfig(sample_size=8, sample_stride=1, sample_n_frames=4, empty_text_prob=0.3)
  mk = lambda: iter(make_train_loader(IndexSource(12), batch_size=4, seed=7, shard_index=0,
                                      shard_count=1, clip=cfg))
  a, b = mk(), mk()
  for _ in range(6):
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x["video"], y["video"])
    assert list(x["text"]) == list(y["text"])
  # Pixel values encode the record index: each epoch is a permutation, reshuffled per epoch.
  def epoch(it):
    return [int(round((v + 1) * 127.5)) for _ in range(3) for v in next(it)["video"][:, 0, 0, 0, 0]]
  c = mk()
  e1, e2 = epoch(c), epoch(c)
  assert sorted(e1) == sorted(e2) == list(range(12)) and e1 != e2


def test_empty_text_dropout_rate():
  cfg = ClipConfig(sample_size=8, sample_stride=1, sample_n_frames=4, empty_text_prob=0.25)
  it = iter(make_train_loader(IndexSource(50), batch_size=50, seed=1, shard_index=0,
                              shard_count=1, clip=cfg))
  texts = [t for _ in range(8) for t in next(it)["text"]]
  assert 0.17 < np.mean([t == "" for t in texts]) < 0.33


def test_iterator_state_resume(video_dir):
  cfg = ClipConfig(sample_size=16, sample_stride=2, sample_n_frames=4)
  mk = lambda: iter(make_train_loader(source(video_dir), batch_size=2, seed=11, shard_index=0,
                                      shard_count=1, clip=cfg))
  it = mk()
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = mk()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["video"], want["video"])
    assert list(got["text"]) == list(want["text"])
  assert resumed.counts == it.counts  # skip counters are part of the state


def test_extra_transforms_and_synthetic_loader():
  src = synthetic.SyntheticMotionSource(8, frames=8, size=32, seed=0)
  cfg = ClipConfig(sample_size=32, sample_stride=1, sample_n_frames=8)
  add_len = lambda ex: {**ex, "text_len": np.int32(len(ex["text"]))}
  b = next(iter(make_train_loader(src, batch_size=4, seed=0, shard_index=0, shard_count=1,
                                  clip=cfg, transforms=[add_len])))
  assert b["video"].shape == (4, 8, 32, 32, 3) and b["text_len"].shape == (4,)
  # Flipped clips get the mirrored caption, so the motion word stays true.
  for video, text in zip(b["video"], b["text"]):
    color, direction = text.split()[1], text.split()[-1]
    assert synthetic.motion_direction(video, color) == direction


# -- TFDS ArrayRecord clips --------------------------------------------------------------------

def test_tfds_builder_round_trip(video_dir, tmp_path):
  from adiff_jax.data import tfds_video
  builder = tfds_video.build_video_clips(
      str(video_dir / "index.csv"), str(video_dir), str(tmp_path / "tfds"), frames=4, size=16,
      sample_stride=3, clips_per_video=2, min_frames=6)
  assert builder.skipped == {"unreadable": 2, "too_short": 1}
  src = tfds_video.TfdsVideoSource(str(tmp_path / "tfds"))
  assert len(src) == 4
  texts = sorted(src[i]["text"] for i in range(len(src)))
  assert texts == ["a red square moving left"] * 2 + ["a red square moving right"] * 2
  ex = src[0]
  assert ex["video"].shape == (4, 16, 16, 3) and ex["video"].dtype == np.uint8
  raw = builder.as_data_source(split="train")[0]
  assert int(raw["num_source_frames"]) in (24, 30)
  cfg = ClipConfig(sample_size=16, sample_stride=1, sample_n_frames=4)
  it = iter(make_train_loader(src, batch_size=2, seed=0, shard_index=0, shard_count=1, clip=cfg))
  b = next(it)
  assert b["video"].shape == (2, 4, 16, 16, 3) and it.counts["ok"] == 2


# -- synthetic motion --------------------------------------------------------------------------

def test_synthetic_determinism_and_captions():
  a = synthetic.SyntheticMotionSource(20, frames=16, size=64, seed=3)
  b = synthetic.SyntheticMotionSource(20, frames=16, size=64, seed=3)
  c = synthetic.SyntheticMotionSource(20, frames=16, size=64, seed=4)
  for i in (0, 7, 19):
    np.testing.assert_array_equal(a[i]["video"], b[i]["video"])
    assert a[i]["text"] == b[i]["text"]
  assert any(not np.array_equal(a[i]["video"], c[i]["video"]) for i in range(5))
  ex = a[0]
  assert ex["video"].shape == (16, 64, 64, 3) and ex["video"].dtype == np.uint8
  p = a.params(0)
  assert ex["text"] == synthetic.caption_for(p.color, p.shape, p.direction)
  assert synthetic.caption_for("red", "circle", "left") == "a red circle moving left"
  img = synthetic.SyntheticMotionSource(10, size=64, seed=0, single_frame=True)
  assert img[0]["video"].shape == (1, 64, 64, 3)
  assert all("moving" not in img[i]["text"] for i in range(10))
  assert len({tuple(np.round(synthetic.object_centroid(img[i]["video"][0], img.params(i).color)))
              for i in range(10)}) >= 8  # positions vary


@pytest.mark.parametrize("direction", synthetic.DIRECTIONS)
@pytest.mark.parametrize("shape", synthetic.SHAPES)
def test_displacement_recovers_direction(direction, shape):
  rng = np.random.default_rng(0)
  for color in synthetic.COLORS:
    p = synthetic.sample_params(rng, frames=16, size=64)
    p = synthetic.ClipParams(**{**p.__dict__, "direction": direction, "shape": shape, "color": color})
    # Re-anchor the start so the path stays inside the frame for the new direction.
    travel = p.speed * 15
    ux, uy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    p = synthetic.ClipParams(**{**p.__dict__, "x0": 32 - ux * travel / 2, "y0": 32 - uy * travel / 2})
    clip = synthetic.render_clip(p, frames=16, size=64)
    d = synthetic.motion_displacement(clip, color)
    np.testing.assert_allclose(d, [ux * travel, uy * travel], atol=0.6)
    assert synthetic.motion_direction(clip, color) == direction
    # Colour-blind (saturation) tracking finds the same motion on the grey backgrounds.
    np.testing.assert_allclose(synthetic.motion_displacement(clip), d, atol=0.1 * travel)
    assert synthetic.motion_direction(clip) == direction
    # Model-range float frames work too.
    assert synthetic.motion_direction(loader.to_model_range(clip), color) == direction




def test_synthetic_fixed_background():
  rand = synthetic.SyntheticMotionSource(6, frames=8, size=32, seed=1)
  flat = synthetic.SyntheticMotionSource(6, frames=8, size=32, seed=1, background=40)
  for i in range(6):
    a, b = rand.params(i), flat.params(i)
    assert (a.color, a.shape, a.direction, a.x0, a.y0, a.radius) == (b.color, b.shape, b.direction, b.x0, b.y0, b.radius)
    video = flat[i]["video"]
    assert b.background == 40 and b.texture_amp == 0.0
    # Most of every frame is exactly the flat grey (no texture); the object is still found.
    assert all(np.median(f.reshape(-1, 3), axis=0).tolist() == [40, 40, 40] for f in video)
    assert synthetic.motion_direction(video) == b.direction
  with pytest.raises(ValueError, match="grey level"):
    synthetic.SyntheticMotionSource(2, background=300).params(0)


def test_single_frame_first_frame():
  cfg = ClipConfig(sample_size=32, single_frame=True, first_frame=True)
  assert all(loader.frame_indices(cfg, 16, u).tolist() == [0] for u in (0.0, 0.5, 0.99))
  rand = ClipConfig(sample_size=32, single_frame=True)
  assert loader.frame_indices(rand, 16, 0.99).tolist() == [15]


@pytest.mark.parametrize("direction", synthetic.DIRECTIONS)
def test_synthetic_trail_behind_the_object(direction):
  # A big red circle on flat grey 40: hand-computed opacity of the trail at points along the path.
  p = synthetic.ClipParams(color="red", shape="circle", direction=direction, x0=32.0, y0=32.0,
                           radius=8.0, speed=1.0, background=40, trail=True)
  frame = synthetic.render_clip(p, frames=1, size=64)[0].astype(np.float32)
  ux, uy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
  red, bg = np.array([220, 40, 40], np.float32), np.float32(40)
  at = lambda k: frame[int(32 + uy * k * 8), int(32 + ux * k * 8)]   # k radii along the motion
  np.testing.assert_allclose(at(0), red, atol=1)                      # the object itself
  np.testing.assert_allclose(at(-1.25), bg + 0.55 * (red - bg), atol=1)  # first ghost only
  np.testing.assert_allclose(at(-2.25), bg + 0.18 * (red - bg), atol=1)  # last ghost only
  np.testing.assert_allclose(at(1.25), [40, 40, 40], atol=0)          # nothing ahead
  # Without the trail the same parameters render the plain object.
  plain = synthetic.render_clip(dataclasses.replace(p, trail=False), frames=1, size=64)[0]
  np.testing.assert_allclose(plain[int(32 - uy * 10), int(32 - ux * 10)], [40, 40, 40], atol=0)


def test_synthetic_trail_keeps_tracking():
  src = synthetic.SyntheticMotionSource(12, frames=16, size=64, seed=3, background=40, trail=True)
  plain = synthetic.SyntheticMotionSource(12, frames=16, size=64, seed=3, background=40)
  for i in range(12):
    assert dataclasses.replace(src.params(i), trail=False) == plain.params(i)
    # The trail moves with the object: colour-blind tracking still finds the direction.
    assert synthetic.motion_direction(src[i]["video"]) == src.params(i).direction


def test_synthetic_travel_range():
  slow = synthetic.SyntheticMotionSource(30, frames=16, size=64, seed=2, background=40, travel_range=(0.1, 0.2))
  default = synthetic.SyntheticMotionSource(30, frames=16, size=64, seed=2, background=40)
  for i in range(30):
    p, q = slow.params(i), default.params(i)
    assert (p.color, p.shape, p.direction, p.radius) == (q.color, q.shape, q.direction, q.radius)
    for params, (lo, hi) in ((p, (0.1, 0.2)), (q, (0.3, 0.5))):
      c = params.centers(16)                                          # (16, 2) x, y
      dist = float(np.abs(c[-1] - c[0]).sum())                        # along one axis only
      assert lo * 64 - 1e-3 <= dist <= hi * 64 + 1e-3, (params, dist)
      assert np.all(c - params.radius >= 0) and np.all(c + params.radius <= 64)
    # Slow clips are still tracked to their direction.
    assert synthetic.motion_direction(slow[i]["video"]) == p.direction


@pytest.mark.parametrize("directions", [("left",), ("up",), ("right", "down")])
def test_synthetic_directions_and_no_flips(directions):
  """A one-direction MotionLoRA set: only those directions are drawn, and the loader (with
  random_flip on, as by default) never flips them: every batch still moves the captioned way."""
  src = synthetic.SyntheticMotionSource(40, frames=16, size=64, seed=1, background=40, directions=directions)
  assert not src.flippable and synthetic.SyntheticMotionSource(4).flippable
  assert {src.params(i).direction for i in range(40)} == set(directions)
  clip = ClipConfig(sample_size=64, sample_stride=1, sample_n_frames=16, random_flip=True, empty_text_prob=0.0)
  it = iter(make_train_loader(src, batch_size=8, seed=0, shard_index=0, shard_count=1, clip=clip))
  for _ in range(3):
    batch = next(it)
    for video, text in zip(batch["video"], batch["text"]):
      d = synthetic.motion_direction(video)
      assert d in directions and text.endswith(f"moving {d}"), (d, text)
  with pytest.raises(ValueError, match="non-empty subset"):
    synthetic.SyntheticMotionSource(4, directions=("sideways",))


def test_flippable_source_does_get_flipped():
  """The check above can fail: the same left-only source, declared flippable, yields right-moving clips."""
  src = synthetic.SyntheticMotionSource(40, frames=16, size=64, seed=1, background=40, directions=("left",))
  src.flippable = True
  clip = ClipConfig(sample_size=64, sample_stride=1, sample_n_frames=16, random_flip=True, empty_text_prob=0.0)
  batch = next(iter(make_train_loader(src, batch_size=16, seed=0, shard_index=0, shard_count=1, clip=clip)))
  assert "right" in {synthetic.motion_direction(v) for v in batch["video"]}


@pytest.mark.parametrize("trail", [False, True])
def test_object_color(trail):
  # Every palette colour on dark, light and textured backgrounds, every shape and direction.
  for background in (20, 80, 180, 230):
    for i, (color, shape, direction) in enumerate(itertools.product(
        synthetic.COLORS, synthetic.SHAPES, synthetic.DIRECTIONS)):
      p = synthetic.ClipParams(color=color, shape=shape, direction=direction, x0=30.0, y0=34.0,
                               radius=6.0, speed=1.0, background=background,
                               texture_amp=8.0 * (i % 2), texture_seed=i, trail=trail)
      frame = synthetic.render_clip(p, frames=1, size=64)[0]
      assert synthetic.object_color(frame) == color, (p, synthetic.object_color(frame))
      # A generated frame: tinted, noisy background, in model range [-1, 1].
      noisy = frame + np.array([-4, 2, 7]) + np.random.default_rng(i).normal(0, 3, frame.shape)
      assert synthetic.object_color(np.clip(noisy, 0, 255) / 127.5 - 1) == color
  # No object: a plain frame, a speck, and saturated noise everywhere.
  rng = np.random.default_rng(0)
  assert synthetic.object_color(np.full((64, 64, 3), 40, np.uint8)) is None
  speck = np.full((64, 64, 3), 40, np.uint8)
  speck[10:12, 10:12] = synthetic.COLORS["red"]
  assert synthetic.object_color(speck) is None
  assert synthetic.object_color(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) is None


def test_trail_direction_reads_single_frames():
  src = synthetic.SyntheticMotionSource(64, frames=16, size=64, seed=5, background=40, trail=True)
  for i in range(64):
    frame = src[i]["video"][i % 16]
    assert synthetic.trail_direction(frame) == src.params(i).direction
  # An empty frame has no heading.
  assert synthetic.trail_direction(np.full((64, 64, 3), 40, np.uint8)) is None


# -- clip coherence (motion evaluation) --------------------------------------------------------

def test_clip_coherence_accepts_rendered_clips():
  # Flat grey 40 (48 clips, every direction) and the default random dark / light / textured
  # backgrounds (24 clips).
  for src in (synthetic.SyntheticMotionSource(48, frames=16, size=64, seed=11, background=40),
              synthetic.SyntheticMotionSource(24, frames=16, size=64, seed=12)):
    seen = set()
    for i in range(len(src)):
      p, video = src.params(i), src[i]["video"]
      for frames in (video, video / np.float32(127.5) - 1):        # uint8 and model range
        r = synthetic.clip_coherence(frames)
        assert r["coherent"] and r["reason"] == "", (i, p, r)
        assert r["present"] == 16 and r["direction"] == p.direction, (i, p, r)
        # The saturated mask's centroid shifts a little with the sub-pixel position (~1 px).
        travel = p.centers(16)[-1] - p.centers(16)[0]
        np.testing.assert_allclose(r["displacement"], travel, atol=0.1 * np.abs(travel).max())
      seen.add(p.direction)
    assert seen == set(synthetic.DIRECTIONS)


def _coherence_clip(**kw):
  # A red circle on flat grey 40 moving right 2 px/frame along y=20 (x 10..40).
  p = synthetic.ClipParams(**{**dict(color="red", shape="circle", direction="right", x0=10.0, y0=20.0,
                                     radius=6.0, speed=2.0, background=40), **kw})
  return p, synthetic.render_clip(p, frames=16, size=64)


def test_clip_coherence_rejects_incoherent_clips():
  p, clip = _coherence_clip()
  check = lambda frames: synthetic.clip_coherence(frames)
  assert check(clip)["coherent"] and check(clip)["direction"] == "right"

  # Frames shuffled in time: the path goes back and forth.
  shuffled = clip[np.random.default_rng(0).permutation(16)]
  assert check(shuffled)["reason"].startswith("not monotone"), check(shuffled)
  # The object vanishes for 4 frames: present in 12 < 14.
  vanish = clip.copy()
  vanish[6:10] = 40
  r = check(vanish)
  assert r["reason"].startswith("object missing") and r["present"] == 12, r
  # ... which is accepted when 12 frames suffice: the 10 px step over the gap is 2 px per frame.
  assert synthetic.clip_coherence(vanish, min_present=12)["coherent"]
  # Teleporting halfway, forward (so the path stays monotone): one 22 px step.
  _, ahead = _coherence_clip(x0=30.0)
  teleport = np.concatenate([clip[:8], ahead[8:]])
  assert check(teleport)["reason"].startswith("jump"), check(teleport)
  # Two objects at once: a blue square moving left lower down, copied into every frame.
  _, other = _coherence_clip(color="blue", shape="square", direction="left", x0=50.0, y0=48.0)
  two = np.where(synthetic.object_mask(other.reshape(-1, 64, 3)).reshape(16, 64, 64, 1), other, clip)
  r = check(two)
  assert r["reason"].startswith("several objects") and r["present"] == 16, r
  # A static object.
  _, static = _coherence_clip(speed=0.0, x0=32.0)
  r = check(static)
  assert r["reason"].startswith("no displacement") and r["direction"] is None, r
  # The size doubles / halves between frames (same path): area ratio 4.
  _, big = _coherence_clip(radius=12.0, y0=32.0)
  _, small = _coherence_clip(y0=32.0)
  pulsing = small.copy()
  pulsing[::2] = big[::2]
  assert check(pulsing)["reason"].startswith("size unstable"), check(pulsing)
  # Pure noise: saturated everywhere, never an object-sized region.
  noise = np.random.default_rng(1).uniform(-1, 1, (16, 64, 64, 3)).astype(np.float32)
  r = check(noise)
  assert r["reason"].startswith("object missing") and not r["coherent"] and r["present"] == 0, r
  # Every rejection is incoherent.
  for frames in (shuffled, vanish, teleport, two, static, pulsing):
    assert not check(frames)["coherent"]
