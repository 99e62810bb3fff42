"""WebVid-style video folders: CSV index source and PyAV frame reading.

The CSV layout is the one the official AnimateDiff loader reads: columns `videoid`, `name`
(the caption) and `page_dir`; the clip lives at `{video_folder}/{videoid}.mp4` (or under
`{video_folder}/{page_dir}/` with `use_page_dir=True`, the layout of the WebVid download
scripts). The source only returns (path, caption): decoding happens in the per-example
transform so one broken file is skipped and counted instead of crashing the loader.
"""
from __future__ import annotations

import csv
import os
from typing import Callable, Sequence

import av
import numpy as np


class VideoTooShort(ValueError):
  """The video has fewer frames than the pipeline accepts."""

  def __init__(self, path: str, num_frames: int, min_frames: int):
    super().__init__(f"{path}: {num_frames} frames < min_frames={min_frames}")
    self.num_frames = num_frames


class WebVidSource:
  """Random-access source over a WebVid CSV; examples are `{"path": str, "text": str}`."""

  def __init__(self, csv_path: str, video_folder: str, *, use_page_dir: bool = False,
               ext: str = ".mp4", check_exists: bool = False):
    with open(csv_path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
    paths, texts = [], []
    for row in rows:
      sub = row.get("page_dir", "") if use_page_dir else ""
      path = os.path.join(video_folder, sub, f"{row['videoid']}{ext}")
      # Missing files are normally left in (and counted as unreadable when sampled);
      # check_exists drops them up front, which costs one stat per row.
      if check_exists and not os.path.exists(path):
        continue
      paths.append(path)
      texts.append(row["name"])
    self._paths: tuple[str, ...] = tuple(paths)
    self._texts: tuple[str, ...] = tuple(texts)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict:
    return {"path": self._paths[index], "text": self._texts[index]}

  def __repr__(self) -> str:
    return f"WebVidSource(len={len(self)})"


def count_frames(path: str) -> int:
  """Frame count from container metadata, or by demuxing packets when it is missing."""
  with av.open(path) as container:
    stream = container.streams.video[0]
    if stream.frames > 0:
      return int(stream.frames)
    return sum(1 for p in container.demux(stream) if p.size > 0)


def _decode(path: str, wanted: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
  """Decodes up to max(wanted); returns the wanted RGB frames and how many frames were seen."""
  want = set(int(i) for i in wanted)
  last = max(want)
  got: dict[int, np.ndarray] = {}
  seen = 0
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    for i, frame in enumerate(container.decode(stream)):
      seen = i + 1
      if i in want:
        got[i] = frame.to_ndarray(format="rgb24")
      if i >= last:
        break
  return got, seen


def read_video_frames(path: str, choose: Callable[[int], np.ndarray], *,
                      min_frames: int = 1) -> tuple[np.ndarray, int]:
  """Reads the frames `choose(num_frames)` picks; returns (uint8 (k, H, W, 3), num_frames).

  Decoding stops at the last wanted frame, so short clips from the start of a long video are
  cheap. Raises `VideoTooShort` below `min_frames`, and PyAV/OS errors for unreadable files.
  """
  n = count_frames(path)
  if n < min_frames:
    raise VideoTooShort(path, n, min_frames)
  indices = np.asarray(choose(n))
  got, seen = _decode(path, indices)
  if len(got) < len(set(indices.tolist())):
    # Metadata over-counted the frames (it happens with some muxers): re-pick with the
    # decoded count, which `_decode` reached by running to the end of the stream.
    n = seen
    if n < min_frames:
      raise VideoTooShort(path, n, min_frames)
    indices = np.asarray(choose(n))
    got, _ = _decode(path, indices)
  return np.stack([got[int(i)] for i in indices]), n


def write_video(path: str, frames: np.ndarray, *, fps: int = 8) -> None:
  """Writes uint8 (T, H, W, 3) frames as H.264 mp4 (even H and W); used by tests and tools."""
  frames = np.asarray(frames, np.uint8)
  _, h, w, _ = frames.shape
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.options = {"crf": "18"}
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
