"""Writing animations: GIF (like the official tool), MP4 (H.264 through imageio-ffmpeg), grids."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """Float frames in [0, 1] (any leading dims) -> uint8."""
  return (np.clip(np.asarray(frames, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_gif(frames: np.ndarray, path: str, fps: int = 8) -> str:
  """(F, H, W, 3) uint8 -> looping GIF."""
  import imageio.v3 as iio
  iio.imwrite(path, frames, extension=".gif", duration=1000.0 / fps, loop=0)
  return path


def save_mp4(frames: np.ndarray, path: str, fps: int = 8) -> str:
  """(F, H, W, 3) uint8 -> H.264 MP4 (yuv420p, so odd sizes are padded to even)."""
  import imageio.v2 as iio2
  f, h, w, _ = frames.shape
  frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  with warnings.catch_warnings():
    # imageio forks ffmpeg and execs it at once, so JAX's fork warning does not apply.
    warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
    with iio2.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                         pixelformat="yuv420p", macro_block_size=1) as writer:
      for fr in frames:
        writer.append_data(fr)
  return path


def grid(videos: Sequence[np.ndarray], cols: int | None = None, pad: int = 2) -> np.ndarray:
  """N videos (F, H, W, 3) -> one (F, rows*H, cols*W, 3) video with a `pad`-pixel border."""
  n = len(videos)
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  f, h, w, c = videos[0].shape
  out = np.zeros((f, rows * (h + pad) + pad, cols * (w + pad) + pad, c), videos[0].dtype)
  for i, v in enumerate(videos):
    r, col = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    out[:, y:y + h, x:x + w] = v
  return out


def read_video(path: str) -> np.ndarray:
  """All frames of a GIF/MP4 as (F, H, W, 3) uint8 (for checks and evaluation)."""
  import imageio.v3 as iio
  frames = iio.imread(path, index=None)
  return np.asarray(frames)[..., :3]
