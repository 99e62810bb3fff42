"""Pre-sampled video clips as a TFDS ArrayRecord dataset, built and read without TensorFlow.

Decoding mp4s is the expensive part of video training input. `AdiffVideoClips` decodes each
video of a WebVid-layout folder once, samples `clips_per_video` clips with the official
stride/linspace rule, resizes + centre-crops them and stores uint8 `(F, size, size, 3)`
tensors with their caption. `TfdsVideoSource` reads them back through
`builder.as_data_source()` (random access, no TF) as `{"video": uint8, "text": str}` records
that `ClipTransform` consumes with `sample_stride=1, sample_n_frames=F` (it then only flips
and rescales).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from adiff_jax.data.loader import clip_indices, resize_center_crop
from adiff_jax.data.webvid import VideoTooShort, WebVidSource, read_video_frames


@dataclasses.dataclass
class VideoClipsConfig(tfds.core.BuilderConfig):
  csv_path: str = ""
  video_folder: str = ""
  frames: int = 16
  size: int = 256
  sample_stride: int = 4
  clips_per_video: int = 1
  min_frames: Optional[int] = None  # None: `frames`
  use_page_dir: bool = False
  seed: int = 0                     # clip starts are a function of (seed, row, clip)


class AdiffVideoClips(tfds.core.GeneratorBasedBuilder):
  """Fixed-size uint8 clips + captions from a WebVid-style CSV and video folder."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # No download checksums to look up. Also sidesteps TFDS resolving its code path through
  # `importlib_resources`, which is an undeclared dependency in tfds 4.9.10.
  code_path = None

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.skipped: dict[str, int] = {"unreadable": 0, "too_short": 0}

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description="Pre-sampled video clips (official AnimateDiff frame sampling).",
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(c.frames, c.size, c.size, 3), dtype=np.uint8),
            "text": tfds.features.Text(),
            "videoid": tfds.features.Text(),
            "num_source_frames": tfds.features.Tensor(shape=(), dtype=np.int32),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    c = self.builder_config
    source = WebVidSource(c.csv_path, c.video_folder, use_page_dir=c.use_page_dir)
    min_frames = c.frames if c.min_frames is None else c.min_frames
    for row in range(len(source)):
      rec = source[row]
      videoid = os.path.splitext(os.path.basename(rec["path"]))[0]
      for k in range(c.clips_per_video):
        u = np.random.default_rng((c.seed, row, k)).random()
        try:
          frames, n = read_video_frames(
              rec["path"], lambda n: clip_indices(n, c.sample_stride, c.frames, u),
              min_frames=min_frames)
        except VideoTooShort:
          self.skipped["too_short"] += 1
          break
        except Exception as e:  # corrupt / missing file: skip the video, keep building
          logging.warning("skipping %s: %r", rec["path"], e)
          self.skipped["unreadable"] += 1
          break
        yield f"{videoid}_{k}", {
            "video": resize_center_crop(frames, (c.size, c.size)),
            "text": rec["text"],
            "videoid": videoid,
            "num_source_frames": np.int32(n),
        }


def build_video_clips(csv_path: str, video_folder: str, data_dir: str, *, frames: int = 16,
                      size: int = 256, sample_stride: int = 4, clips_per_video: int = 1,
                      min_frames: Optional[int] = None, use_page_dir: bool = False,
                      seed: int = 0, name: Optional[str] = None) -> AdiffVideoClips:
  """Builds (or reuses) the dataset under `data_dir`; `builder.data_dir` is the version dir
  to pass to `TfdsVideoSource`, `builder.skipped` counts videos left out in this build."""
  config = VideoClipsConfig(
      name=name or f"f{frames}_s{size}_st{sample_stride}", csv_path=csv_path,
      video_folder=video_folder, frames=frames, size=size, sample_stride=sample_stride,
      clips_per_video=clips_per_video, min_frames=min_frames, use_page_dir=use_page_dir,
      seed=seed)
  builder = AdiffVideoClips(data_dir=data_dir, config=config, file_format="array_record")
  builder.download_and_prepare()
  return builder


def _find_version_dir(data_dir: str) -> str:
  if os.path.exists(os.path.join(data_dir, "dataset_info.json")):
    return data_dir
  found = [root for root, _, files in os.walk(data_dir) if "dataset_info.json" in files]
  if len(found) != 1:
    raise FileNotFoundError(f"expected one prepared dataset under {data_dir}, found {found}")
  return found[0]


class TfdsVideoSource:
  """Random-access `{"video": uint8 (F, S, S, 3), "text": str}` over a prepared dataset.

  data_dir: the dataset version directory (`builder.data_dir`), or any parent holding exactly
  one prepared dataset.
  """

  def __init__(self, data_dir: str, split: str = "train"):
    self.data_dir = _find_version_dir(data_dir)
    self.split = split
    self._source = tfds.builder_from_directory(self.data_dir).as_data_source(split=split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    ex = self._source[int(index)]
    text = ex["text"]
    return {"video": np.asarray(ex["video"], np.uint8),
            "text": text.decode("utf-8") if isinstance(text, bytes) else str(text)}

  def __repr__(self) -> str:
    return f"TfdsVideoSource({self.data_dir!r}, split={self.split!r}, len={len(self)})"
