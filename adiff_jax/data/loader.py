"""Training input pipeline: clip sampling transform and a sharded, checkpointable grain loader.

Sampling follows the official AnimateDiff `WebVid10M` dataset: for a video of n frames,
stride s and F output frames, clip_length = min(n, (F-1)*s + 1), a uniform start in
[0, n - clip_length], indices = linspace(start, start + clip_length - 1, F) truncated to int;
then random horizontal flip, resize of the shorter side, centre crop and scaling to [-1, 1].
Single-frame (image) mode picks one uniform frame instead. All randomness comes from the
per-example generator grain derives from (seed, index), so a batch is a pure function of
(seed, shard, step).

Examples that cannot be used (unreadable file, too few frames) come out of the transform as
skip markers and are dropped, and counted, by the batching iterator; its state (including
the counters) is what `get_state()` / `set_state()` save and restore.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import av
import grain
import numpy as np
from PIL import Image

from adiff_jax.data.webvid import VideoTooShort, read_video_frames
from adiff_jax.errors import InputError

SKIP_KEY = "_skip"
SKIP_REASONS = ("unreadable", "too_short")


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  sample_size: int | tuple[int, int] = 256  # output (H, W); an int means square
  sample_stride: int = 4
  sample_n_frames: int = 16
  single_frame: bool = False       # image / domain-adapter training: one random frame (F = 1)
  first_frame: bool = False        # single_frame: always the clip's first frame instead
  min_frames: Optional[int] = None  # videos with fewer frames are skipped; None: F (1 in single-frame)
  random_flip: bool = True
  empty_text_prob: float = 0.0     # caption -> "" with this probability (official training: 0.1)

  @property
  def size_hw(self) -> tuple[int, int]:
    s = self.sample_size
    return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

  @property
  def num_frames(self) -> int:
    return 1 if self.single_frame else self.sample_n_frames

  @property
  def effective_min_frames(self) -> int:
    return self.num_frames if self.min_frames is None else self.min_frames


def clip_indices(num_frames: int, sample_stride: int, sample_n_frames: int, u: float) -> np.ndarray:
  """Official clip indices; `u` in [0, 1) picks the start (start = floor(u * #starts))."""
  clip_length = min(num_frames, (sample_n_frames - 1) * sample_stride + 1)
  start = min(int(u * (num_frames - clip_length + 1)), num_frames - clip_length)
  return np.linspace(start, start + clip_length - 1, sample_n_frames, dtype=int)


def frame_indices(cfg: ClipConfig, num_frames: int, u: float) -> np.ndarray:
  if cfg.single_frame:
    return np.array([0 if cfg.first_frame else min(int(u * num_frames), num_frames - 1)])
  return clip_indices(num_frames, cfg.sample_stride, cfg.sample_n_frames, u)


def resize_center_crop(frames: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """uint8 (T, H, W, 3) -> uint8 (T, h, w, 3): scale so the crop fits, then centre crop.

  For a square target this is torchvision's Resize(shorter side) + CenterCrop; PIL bilinear
  anti-aliases when downscaling, like torchvision's antialias=True.
  """
  th, tw = size_hw
  _, h, w, _ = frames.shape
  if th / h >= tw / w:
    nh, nw = th, max(tw, int(w * th / h))
  else:
    nh, nw = max(th, int(h * tw / w)), tw
  if (nh, nw) != (h, w):
    frames = np.stack([np.asarray(Image.fromarray(f).resize((nw, nh), Image.BILINEAR)) for f in frames])
  top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
  return frames[:, top:top + th, left:left + tw]


def to_model_range(frames: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (Normalize(0.5, 0.5) after ToTensor)."""
  return frames.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


class ClipTransform(grain.transforms.RandomMap):
  """Raw record -> `{"video": float32 (F, h, w, 3) in [-1, 1], "text": str}` or a skip marker.

  Records are either `{"path", "text"}` (decoded here with PyAV) or `{"video": uint8
  (n, H, W, 3), "text"}` already in memory (synthetic / TFDS clips). An optional
  `text_flipped` is used as the caption of flipped clips (e.g. "left" <-> "right").
  """

  def __init__(self, cfg: ClipConfig):
    self.cfg = cfg

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    # Draw a fixed number of uniforms first so every choice is independent of the branches.
    u_start, u_flip, u_text = rng.random(3)
    return self.apply(record, u_start=u_start, flip=bool(self.cfg.random_flip and u_flip < 0.5),
                      drop_text=bool(u_text < self.cfg.empty_text_prob))

  def apply(self, record: dict, *, u_start: float, flip: bool, drop_text: bool) -> dict:
    cfg = self.cfg
    choose = lambda n: frame_indices(cfg, n, u_start)
    try:
      if "video" in record:
        video = np.asarray(record["video"], np.uint8)
        if len(video) < cfg.effective_min_frames:
          raise VideoTooShort("<array>", len(video), cfg.effective_min_frames)
        frames = video[choose(len(video))]
      else:
        frames, _ = read_video_frames(record["path"], choose, min_frames=cfg.effective_min_frames)
    except VideoTooShort as e:
      return {SKIP_KEY: "too_short", "detail": str(e)}
    except (av.FFmpegError, OSError, ValueError, IndexError, KeyError) as e:
      # Includes missing files and corrupt containers / streams.
      return {SKIP_KEY: "unreadable", "detail": f"{record.get('path', '<array>')}: {e!r}"}
    frames = resize_center_crop(frames, cfg.size_hw)
    text = _as_str(record["text"])
    if flip:
      frames = frames[:, :, ::-1]
      text = _as_str(record.get("text_flipped", text))
    if drop_text:
      text = ""
    return {"video": to_model_range(frames), "text": text}


class PrecomputedTransform(grain.transforms.RandomMap):
  """Pre-encoded record (see `adiff_jax.train.precompute`): the clip is already sampled, so only
  the caption dropout is left. With stored text embeddings the dropout swaps in the stored
  empty-caption embedding (the text encoder never runs); otherwise the caption becomes ""."""

  def __init__(self, empty_text_prob: float, empty_text_emb: Optional[np.ndarray] = None):
    self.empty_text_prob = empty_text_prob
    self.empty_text_emb = empty_text_emb

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    rec = dict(record)
    if rng.random() < self.empty_text_prob:
      rec["text"] = ""
      if "text_emb" in rec:
        rec["text_emb"] = self.empty_text_emb
    return rec


def _as_str(t: Any) -> str:
  return t.decode("utf-8") if isinstance(t, bytes) else str(t)


def collate(examples: Sequence[dict]) -> dict:
  """Stacks examples: `video` (B, F, h, w, 3) float32, `text` (B,) numpy unicode array."""
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


class _SkipBatchIterator(grain.DatasetIterator):
  """Drops (and counts) skip markers, stacks `batch_size` good examples, drops the remainder."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, max_consecutive_skips: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._max_skips = max_consecutive_skips
    self._counts = {"ok": 0, **{r: 0 for r in SKIP_REASONS}}

  @property
  def counts(self) -> dict[str, int]:
    """Examples seen so far by outcome: `ok` plus one entry per skip reason."""
    return dict(self._counts)

  def __next__(self) -> dict:
    examples, run = [], 0
    while len(examples) < self._batch_size:
      ex = next(self._parent)  # StopIteration mid-batch: the partial batch is dropped
      reason = ex.get(SKIP_KEY)
      if reason is None:
        self._counts["ok"] += 1
        examples.append(ex)
        run = 0
        continue
      self._counts[reason] += 1
      logging.debug("skipping example (%s): %s", reason, ex.get("detail"))
      run += 1
      # A dataset where nothing decodes would otherwise spin forever on an infinite repeat.
      if run >= self._max_skips:
        raise RuntimeError(f"{run} consecutive examples skipped (counts {self._counts}); last: "
                           f"{ex.get('detail')}")
    return collate(examples)

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "counts": dict(self._counts)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._counts = {k: int(v) for k, v in state["counts"].items()}


class _SkipBatchDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, batch_size: int, max_consecutive_skips: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._max_skips = max_consecutive_skips

  def __iter__(self) -> _SkipBatchIterator:
    return _SkipBatchIterator(self._parent.__iter__(), self._batch_size, self._max_skips)

  def __str__(self) -> str:
    return f"SkipBatchDataset(batch_size={self._batch_size})"


def _unless_skipped(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
  return lambda ex: ex if SKIP_KEY in ex else fn(ex)


def shard_dataset(ds: grain.MapDataset, shard_index: int, shard_count: int) -> grain.MapDataset:
  """Strided shard of the index space; trailing len % shard_count records are dropped so every
  host sees the same number of records per epoch."""
  if not 0 <= shard_index < shard_count:
    raise InputError(f"shard_index {shard_index} not in [0, {shard_count})")
  usable = (len(ds) // shard_count) * shard_count
  return ds[:usable][shard_index::shard_count]


def _example_transform(source, clip: ClipConfig) -> grain.transforms.RandomMap:
  """Raw sources go through clip sampling; pre-encoded ones only through caption dropout."""
  if getattr(source, "is_precomputed", False):
    return PrecomputedTransform(clip.empty_text_prob, source.empty_text_emb)
  return ClipTransform(for_source(clip, source))


def for_source(clip: ClipConfig, source) -> ClipConfig:
  """`clip` as it applies to `source`: no flips for a source that is not `flippable` (e.g. a
  one-direction MotionLoRA set, where a flip would teach the opposite motion)."""
  if getattr(source, "flippable", True):
    return clip
  return dataclasses.replace(clip, random_flip=False)


def make_train_loader(source, *, batch_size: int, seed: int,
                      shard_index: Optional[int] = None, shard_count: Optional[int] = None,
                      num_epochs: Optional[int] = None, worker_count: int = 0,
                      clip: ClipConfig = ClipConfig(), shuffle: bool = True,
                      transforms: Sequence[Callable[[dict], dict]] = (),
                      num_threads: int = 2, prefetch_buffer_size: Optional[int] = None,
                      worker_buffer_size: int = 1,
                      max_consecutive_skips: int = 1000) -> _SkipBatchDataset:
  """Builds the per-host training loader; `iter(loader)` yields batches and has
  `get_state()` / `set_state()` / `counts`.

  source: random-access records (`WebVidSource`, `SyntheticMotionSource`, `TfdsVideoSource`), or
    a `PrecomputedSource` (already-sampled latents: no clip sampling, only caption dropout).
  shard_index / shard_count: this host's shard; None means `jax.process_index()` /
    `jax.process_count()`.
  num_epochs: None repeats forever; each epoch is reshuffled and re-sampled.
  worker_count: grain worker processes (0: decode in this process with `num_threads` threads;
    > 0 needs absl flags parsed and an importable `__main__`, see docs/data.md).
  transforms: extra per-example callables applied after `ClipTransform` (skips pass through).
  prefetch_buffer_size: examples buffered per process (None: 2 * batch_size).
  """
  if shard_index is None or shard_count is None:
    import jax  # only when the caller leaves sharding to the JAX process layout
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  ds = shard_dataset(grain.MapDataset.source(source), shard_index, shard_count)
  if len(ds) == 0:
    raise InputError(f"shard {shard_index}/{shard_count} of a {len(source)}-record source is empty")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  # After repeat, so every epoch draws new clip starts / flips / caption drops.
  ds = ds.random_map(_example_transform(source, clip), seed=seed)
  for fn in transforms:
    ds = ds.map(_unless_skipped(fn))
  buffer = 2 * batch_size if prefetch_buffer_size is None else prefetch_buffer_size
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
  return _SkipBatchDataset(it, batch_size, max_consecutive_skips)
