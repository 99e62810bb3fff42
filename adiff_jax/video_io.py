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


_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_frames(path: str) -> np.ndarray:
  """A video file (GIF/MP4/...) or a folder of images (sorted by name) -> (F, H, W, 3) uint8.
  Unreadable input raises InputError naming the path."""
  import os
  from adiff_jax.errors import InputError
  if os.path.isdir(path):
    from PIL import Image
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(_IMAGE_EXTS))
    if not names:
      raise InputError(f"{path}: no images ({', '.join(_IMAGE_EXTS)}) in this folder")
    try:
      frames = [np.asarray(Image.open(os.path.join(path, n)).convert("RGB")) for n in names]
    except (OSError, ValueError) as e:
      raise InputError(f"{path}: cannot read an image: {e}") from None
    if len({f.shape for f in frames}) > 1:
      raise InputError(f"{path}: the images differ in size ({sorted({f.shape[:2] for f in frames})})")
    return np.stack(frames)
  if not os.path.isfile(path):
    raise InputError(f"video not found: {path}")
  try:
    frames = read_video(path)
  except Exception as e:   # imageio raises many types for corrupt or unknown files
    raise InputError(f"cannot read video {path}: {e}") from None
  if frames.ndim == 3:     # a still image: one frame
    frames = frames[None]
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise InputError(f"{path}: expected RGB frames, got an array of shape {frames.shape}")
  return frames


def fit_frames(frames: np.ndarray, count: int, height: int, width: int, what: str, path: str):
  """(F, H, W, 3) uint8 -> (count, height, width, 3) float32 in [0, 1]: the first `count` frames
  (an error if there are fewer), resized (bilinear, no crop: diffusers' video processor) with a
  note when the size differs."""
  from adiff_jax.errors import InputError
  if len(frames) < count:
    raise InputError(f"{what} {path} has {len(frames)} frames, the clip needs {count}: "
                     f"lower --frames or give a longer {what}")
  if len(frames) > count:
    print(f"note: {what} {path} has {len(frames)} frames: using the first {count}")
  frames = frames[:count]
  h0, w0 = frames.shape[1:3]
  if (h0, w0) != (height, width):
    from PIL import Image
    print(f"note: {what} {path} is {w0}x{h0}: resized to {width}x{height}")
    frames = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR))
                       for f in frames])
  return frames.astype(np.float32) / 255.0
