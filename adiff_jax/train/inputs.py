"""Host-side input: data source -> per-shard grain loaders -> tokenized host batches.

The dataset is cut into `num_shards` fixed shards (default: one per process) and each process
reads a contiguous block of them, concatenated in shard order. The global batch is therefore
the same however many processes read it: one process with num_shards=2 sees exactly what two
processes see, and a run can resume on a different host count as long as num_shards stays.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from adiff_jax.data import ClipConfig, SyntheticMotionSource, WebVidSource, make_train_loader
from adiff_jax.tokenizer import CLIPTokenizer
from adiff_jax.train.config import DataConfig, TrainConfig
from adiff_jax.train.state import IMAGE_STAGES
from adiff_jax.errors import InputError


# Per-example arrays a host batch may carry: pixels, or pre-encoded latents (+ text embeddings).
ARRAY_KEYS = ("video", "latent_mean", "latent_std", "text_emb")


def make_source(data: DataConfig):
  if data.source == "synthetic":
    return SyntheticMotionSource(data.num_examples, frames=data.synthetic_frames,
                                 size=data.synthetic_size, seed=0, single_frame=data.synthetic_still,
                                 background=data.synthetic_background, trail=data.synthetic_trail,
                                 travel_range=data.synthetic_travel,
                                 directions=data.synthetic_directions)
  if data.source == "webvid":
    if not data.csv_path or not data.video_folder:
      raise InputError("data.source=webvid needs data.csv_path and data.video_folder")
    return WebVidSource(data.csv_path, data.video_folder, use_page_dir=data.use_page_dir)
  if data.source == "tfds":
    if not data.tfds_dir:
      raise InputError("data.source=tfds needs data.tfds_dir")
    from adiff_jax.data import tfds_video
    return tfds_video.TfdsVideoSource(data.tfds_dir)
  if data.source == "precomputed":
    if not data.precomputed_dir:
      raise InputError("data.source=precomputed needs data.precomputed_dir")
    from adiff_jax.data.precomputed import PrecomputedSource
    return PrecomputedSource(data.precomputed_dir)
  raise InputError(f"unknown data.source {data.source!r}; choose synthetic, webvid, tfds or "
                   "precomputed")


def check_precomputed(cfg: TrainConfig, source) -> None:
  """Pre-encoded clips must have the shape this run would sample (frames, size)."""
  if cfg.stage == "vae":
    raise InputError("the vae stage trains the VAE on pixels: it cannot use precomputed latents")
  m, clip = source.manifest, clip_config(cfg)
  want = {"num_frames": clip.num_frames, "sample_size": list(clip.size_hw)}
  have = {k: m[k] for k in want}
  if have != want:
    raise InputError(f"{source.directory} holds clips with {have}, this run samples {want}; "
                     "precompute again with this config")


def clip_config(cfg: TrainConfig) -> ClipConfig:
  d = cfg.data
  # Image stages (domain adapter, image, vae) always train on single frames.
  single = d.single_frame or cfg.stage in IMAGE_STAGES
  return ClipConfig(sample_size=d.sample_size, sample_stride=d.sample_stride,
                    sample_n_frames=d.sample_n_frames, single_frame=single, first_frame=d.first_frame,
                    min_frames=d.min_frames,
                    random_flip=d.random_flip, empty_text_prob=d.empty_text_prob)


class HostBatches:
  """Iterator of this process's share of the global batch: {"video": (b, F, H, W, 3) f32,
  "ids": (b, 77) int32, "text": list[str]}, with checkpointable per-shard state. A precomputed
  source gives "latent_mean" / "latent_std" (b, F, h, w, 4) f16 instead of "video", and
  "text_emb" (b, 77, D) f16 instead of "ids" when it stores text embeddings."""

  def __init__(self, cfg: TrainConfig, global_batch: int, process_index: int, process_count: int,
               tokenizer: Optional[CLIPTokenizer] = None, source=None):
    d = cfg.data
    self.num_shards = d.num_shards or process_count
    if self.num_shards % process_count:
      raise InputError(f"data.num_shards={self.num_shards} must be a multiple of the "
                       f"{process_count} processes")
    if global_batch % self.num_shards:
      raise InputError(f"global batch {global_batch} is not divisible by data.num_shards="
                       f"{self.num_shards}")
    per = self.num_shards // process_count
    self.shards = list(range(process_index * per, (process_index + 1) * per))
    source = make_source(d) if source is None else source
    if getattr(source, "is_precomputed", False):
      check_precomputed(cfg, source)
    clip = clip_config(cfg)
    self.iters = {
        s: iter(make_train_loader(source, batch_size=global_batch // self.num_shards,
                                  seed=cfg.data_seed, shard_index=s, shard_count=self.num_shards,
                                  clip=clip, worker_count=d.worker_count,
                                  num_threads=d.num_threads))
        for s in self.shards}
    self.tokenizer = tokenizer or CLIPTokenizer.default()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    parts = [next(self.iters[s]) for s in self.shards]
    text = [str(t) for p in parts for t in p["text"]]
    out = {k: np.concatenate([p[k] for p in parts]) for k in ARRAY_KEYS if k in parts[0]}
    if "video" in out:
      out["video"] = out["video"].astype(np.float32)
    if "text_emb" not in out:     # stored embeddings make the tokens (and the encoder) unneeded
      out["ids"] = self.tokenizer(text)
    return {**out, "text": text}

  def get_state(self) -> dict:
    return {str(s): it.get_state() for s, it in self.iters.items()}

  def set_state(self, states: dict) -> None:
    for s, it in self.iters.items():
      if str(s) not in states:
        raise InputError(f"checkpoint has no data state for shard {s} (has {sorted(states)}); "
                         "resume with the same data.num_shards")
      it.set_state(states[str(s)])

  @property
  def counts(self) -> dict:
    total: dict = {}
    for it in self.iters.values():
      for k, v in it.counts.items():
        total[k] = total.get(k, 0) + v
    return total
