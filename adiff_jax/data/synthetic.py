"""Procedural motion clips: a coloured shape sliding in a named direction on a neutral background.

Cheap (pure numpy, anti-aliased edges), deterministic per (seed, index), and with captions
whose motion words can be checked on generated videos: `object_centroid` / `motion_direction`
locate the object (by colour, or colour-blind by saturation) and recover its direction, which
the motion-accuracy evaluation uses. Backgrounds are neutral greys (dark or light, optionally
with a faint smooth texture, or one fixed flat grey) so that every palette colour stays far
from the background in RGB.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from PIL import Image
from adiff_jax.errors import InputError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 210),
    "cyan": (40, 205, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# Unit motion per direction in image coordinates (x right, y down).
_DIRECTION_XY = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
# (distance behind the centre in radii, opacity) of the trail's ghosts.
_TRAIL = ((0.5, 0.55), (1.0, 0.35), (1.5, 0.18))
_HFLIP = {"left": "right", "right": "left", "up": "up", "down": "down"}


def caption_for(color: str, shape: str, direction: Optional[str] = None) -> str:
  """"a red circle moving left"; without a direction (still image) "a red circle"."""
  base = f"a {color} {shape}"
  return base if direction is None else f"{base} moving {direction}"


@dataclasses.dataclass(frozen=True)
class ClipParams:
  color: str
  shape: str
  direction: Optional[str]        # None: static object (image mode)
  x0: float                       # object centre at frame 0, pixels
  y0: float
  radius: float                   # circumradius-like size, pixels
  speed: float = 0.0              # pixels per frame along `direction`
  background: int = 50            # grey level 0..255
  texture_amp: float = 0.0        # amplitude of the smooth background texture (grey levels)
  texture_seed: int = 0
  trail: bool = False             # fading ghosts behind a moving object (see `render_clip`)

  def caption(self) -> str:
    return caption_for(self.color, self.shape, self.direction)

  def flipped_caption(self) -> str:
    """Caption after a horizontal flip (left <-> right)."""
    d = None if self.direction is None else _HFLIP[self.direction]
    return caption_for(self.color, self.shape, d)

  def centers(self, frames: int) -> np.ndarray:
    """(frames, 2) object centre (x, y) per frame."""
    ux, uy = _DIRECTION_XY[self.direction] if self.direction else (0.0, 0.0)
    t = np.arange(frames, dtype=np.float32) * self.speed
    return np.stack([self.x0 + ux * t, self.y0 + uy * t], axis=1)


def _background(p: ClipParams, size: int) -> np.ndarray:
  bg = np.full((size, size), float(p.background), np.float32)
  if p.texture_amp > 0:
    noise = np.random.default_rng(p.texture_seed).standard_normal((6, 6)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(noise, mode="F").resize((size, size), Image.BILINEAR))
    bg = bg + p.texture_amp * smooth / max(1e-6, float(np.abs(smooth).max()))
  return bg


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Anti-aliased coverage in [0, 1] from an approximate signed distance (1 px ramp)."""
  if shape == "circle":
    d = np.sqrt(dx * dx + dy * dy) - r
  elif shape == "square":
    d = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r  # similar area to the circle
  elif shape == "triangle":
    # Upward equilateral triangle with circumradius r: three half-planes at inradius r/2.
    s = np.float32(np.sqrt(3.0) / 2)
    d = np.maximum(np.maximum(dy, -s * dx - 0.5 * dy), s * dx - 0.5 * dy) - 0.5 * r
  else:
    raise InputError(f"unknown shape {shape!r}; expected one of {SHAPES}")
  return np.clip(0.5 - d, 0.0, 1.0)


def render_clip(p: ClipParams, *, frames: int, size: int) -> np.ndarray:
  """Renders uint8 (frames, size, size, 3); pixel (row y, column x) has centre (x, y)."""
  if p.color not in COLORS:
    raise InputError(f"unknown color {p.color!r}; expected one of {tuple(COLORS)}")
  c = p.centers(frames)
  grid = np.arange(size, dtype=np.float32)
  dx = grid[None, None, :] - c[:, 0, None, None]
  dy = grid[None, :, None] - c[:, 1, None, None]
  alpha = _coverage(p.shape, dx, dy, p.radius)                       # (T, S, S)
  if p.trail and p.direction is not None:
    # Fading copies behind the object, like a long exposure: a single frame then shows which way
    # the object goes (as a real car or animal faces its way), so an image model trained on single
    # frames has to read the direction word, and the motion module can read it from its features.
    ux, uy = _DIRECTION_XY[p.direction]
    for dist, weight in _TRAIL:
      d = dist * p.radius
      alpha = np.maximum(alpha, weight * _coverage(p.shape, dx + ux * d, dy + uy * d, p.radius))
  alpha = alpha[..., None]                                            # (T, S, S, 1)
  bg = _background(p, size)[None, :, :, None]
  color = np.asarray(COLORS[p.color], np.float32)
  out = bg * (1.0 - alpha) + color * alpha
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def sample_params(rng: np.random.Generator, *, frames: int, size: int,
                  single_frame: bool = False, background: Optional[int] = None,
                  trail: bool = False, travel_range: tuple[float, float] = (0.3, 0.5),
                  directions: tuple[str, ...] = DIRECTIONS) -> ClipParams:
  """Random clip parameters; the whole path stays inside the frame. `background` (0..255):
  that flat grey for every clip instead of a random dark/light, maybe textured one. `trail`:
  moving objects draw a fading trail (the other parameters do not change). `travel_range`: the
  first-to-last-frame distance is drawn uniformly from it, in frame sizes. `directions`: the
  directions drawn from (e.g. ("left",) for a one-direction MotionLoRA dataset)."""
  fixed = background
  if fixed is not None and not 0 <= fixed <= 255:
    raise InputError(f"background must be a grey level in 0..255, got {fixed}")
  check_directions(directions)
  color = str(rng.choice(list(COLORS)))
  shape = str(rng.choice(SHAPES))
  direction = None if single_frame else str(rng.choice(list(directions)))
  radius = float(size * rng.uniform(0.09, 0.15))
  lo, hi = radius + 1.0, size - radius - 1.0
  travel = 0.0 if direction is None or frames < 2 else float(size * rng.uniform(*travel_range))
  travel = min(travel, hi - lo)
  along = rng.uniform(lo, hi - travel)   # start for a positive direction
  across = rng.uniform(lo, hi)
  if direction in ("left", "up"):
    along += travel                      # start high, move towards lo
  x0, y0 = (along, across) if direction in ("left", "right") else (across, along)
  if direction is None:
    x0, y0 = rng.uniform(lo, hi), rng.uniform(lo, hi)
  dark = rng.random() < 0.5
  background = int(rng.integers(15, 90) if dark else rng.integers(170, 236))
  texture_amp = 0.0 if rng.random() < 0.5 else float(rng.uniform(4.0, 12.0))
  texture_seed = int(rng.integers(2**31))
  if fixed is not None:               # drawn anyway above: the other parameters do not change
    background, texture_amp = int(fixed), 0.0
  return ClipParams(color=color, shape=shape, direction=direction, x0=float(x0), y0=float(y0),
                    radius=radius, speed=travel / max(frames - 1, 1), background=background,
                    texture_amp=texture_amp, texture_seed=texture_seed, trail=trail)


def check_directions(directions) -> None:
  bad = [d for d in directions if d not in DIRECTIONS]
  if not directions or bad:
    raise InputError(f"synthetic directions must be a non-empty subset of {list(DIRECTIONS)}, "
                     f"got {list(directions)}")


class SyntheticMotionSource:
  """Random-access source of `{"video": uint8 (F, S, S, 3), "text", "text_flipped"}`.

  Example i depends only on (seed, i). `single_frame=True` renders still images captioned
  "a red circle" (positions vary) for image / domain-adapter training. `background`: one flat
  grey level; `trail`: moving objects draw a fading trail; `directions`: the directions drawn
  from (see `sample_params`). A source restricted to some directions is not `flippable`: a
  horizontal flip would turn its "left" clips into "right" ones.
  """

  def __init__(self, num_examples: int, frames: int = 16, size: int = 64, seed: int = 0, *,
               single_frame: bool = False, background: Optional[int] = None, trail: bool = False,
               travel_range: tuple[float, float] = (0.3, 0.5),
               directions: tuple[str, ...] = DIRECTIONS):
    check_directions(directions)
    self.num_examples = num_examples
    self.frames = 1 if single_frame else frames
    self.size = size
    self.seed = seed
    self.single_frame = single_frame
    self.background = background
    self.trail = trail
    self.travel_range = tuple(travel_range)
    self.directions = tuple(directions)
    self.flippable = set(self.directions) == set(DIRECTIONS)

  def __len__(self) -> int:
    return self.num_examples

  def params(self, index: int) -> ClipParams:
    if not 0 <= index < self.num_examples:
      raise IndexError(index)
    rng = np.random.default_rng((self.seed, index))
    return sample_params(rng, frames=self.frames, size=self.size, single_frame=self.single_frame,
                         background=self.background, trail=self.trail,
                         travel_range=self.travel_range, directions=self.directions)

  def __getitem__(self, index: int) -> dict:
    p = self.params(int(index))
    return {"video": render_clip(p, frames=self.frames, size=self.size),
            "text": p.caption(), "text_flipped": p.flipped_caption()}

  def __repr__(self) -> str:
    return (f"SyntheticMotionSource(n={self.num_examples}, frames={self.frames}, "
            f"size={self.size}, seed={self.seed})")


def _to_uint8_range(frames: np.ndarray) -> np.ndarray:
  """uint8 as is; floating frames are taken as model-range [-1, 1]."""
  frames = np.asarray(frames)
  if np.issubdtype(frames.dtype, np.floating):
    return (frames.astype(np.float32) + 1.0) * 127.5
  return frames.astype(np.float32)


def _chroma(f: np.ndarray) -> np.ndarray:
  """(H, W) max - min over RGB: 0 for greys, large for every palette colour."""
  return f.max(-1) - f.min(-1)


def _dominant_direction(dx: float, dy: float) -> str:
  if abs(dx) >= abs(dy):
    return "right" if dx > 0 else "left"
  return "down" if dy > 0 else "up"


def object_mask(frame: np.ndarray, color: Optional[str] = None, *, threshold: float = 80.0,
                chroma_threshold: float = 60.0) -> np.ndarray:
  """(H, W) bool mask of the object. With `color`: pixels within `threshold` (RGB distance,
  0..255 units) of that palette colour. Without: pixels whose chroma (max - min over RGB)
  exceeds `chroma_threshold`: every palette colour is saturated, every background grey, so this
  finds the object whatever colour a model gave it. frame: (H, W, 3) uint8 or [-1, 1] floats."""
  f = _to_uint8_range(frame)
  if color is None:
    return _chroma(f) > chroma_threshold
  return np.linalg.norm(f - np.asarray(COLORS[color], np.float32), axis=-1) < threshold


def object_centroid(frame: np.ndarray, color: Optional[str] = None, *, min_pixels: int = 4,
                    **kw) -> Optional[np.ndarray]:
  """(x, y) centroid of `object_mask(frame, color)`, or None when it has fewer than
  `min_pixels` pixels."""
  ys, xs = np.nonzero(object_mask(frame, color, **kw))
  if len(xs) < min_pixels:
    return None
  return np.array([xs.mean(), ys.mean()], np.float32)


def object_color(frame: np.ndarray, *, min_pixels: int = 12, max_fraction: float = 0.25,
                 **kw) -> Optional[str]:
  """The palette colour of the object (the saturated pixels of `object_mask(frame)`), or None
  when there is no object-sized region (fewer than `min_pixels`, or more than `max_fraction` of
  the frame: a noisy image is saturated everywhere). Each pixel votes, weighted by its distance
  from the background (the median grey of the rest), for the palette colour whose offset from
  the background points the same way: faded trail pixels vote for their object's colour."""
  mask = object_mask(frame, **kw)
  f = _to_uint8_range(frame)
  n = int(mask.sum())
  if n < min_pixels or n > max_fraction * mask.size:
    return None
  bg = np.median(f[~mask], axis=0)
  off = f[mask] - bg                                                 # (n, 3)
  pal = np.stack([np.asarray(c, np.float32) for c in COLORS.values()]) - bg
  cos = (off @ pal.T) / (np.linalg.norm(off, axis=1, keepdims=True) * np.linalg.norm(pal, axis=1) + 1e-6)
  votes = np.bincount(cos.argmax(1), weights=np.linalg.norm(off, axis=1), minlength=len(COLORS))
  return list(COLORS)[int(votes.argmax())]


def trail_direction(frame: np.ndarray, *, chroma_threshold: float = 60.0,
                    min_pixels: int = 8) -> Optional[str]:
  """Direction a single frame's object is heading, read from its trail (`trail=True` clips):
  the most saturated part (the object) sits ahead of the centroid of all saturated pixels
  (object + fading trail). None without an object."""
  chroma = _chroma(_to_uint8_range(frame))
  mask = chroma > chroma_threshold
  if mask.sum() < min_pixels:
    return None
  core = chroma > 0.8 * chroma[mask].max()
  ys, xs = np.nonzero(mask)
  yc, xc = np.nonzero(core)
  return _dominant_direction(xc.mean() - xs.mean(), yc.mean() - ys.mean())


def motion_displacement(frames: np.ndarray, color: Optional[str] = None, **kw) -> Optional[np.ndarray]:
  """(dx, dy) first-to-last displacement of the object (found by `color`, or by saturation when
  None), from a least-squares line through the per-frame centroids (robust to frames where the
  object is not found); None if < 2 found."""
  t, pts = [], []
  for i, frame in enumerate(frames):
    c = object_centroid(frame, color, **kw)
    if c is not None:
      t.append(i)
      pts.append(c)
  if len(t) < 2:
    return None
  return _fit_displacement(t, pts, len(frames))


def _fit_displacement(t, pts, frames: int) -> np.ndarray:
  """First-to-last-frame (dx, dy) of a least-squares line through centroids `pts` (x, y) found at
  frame indices `t`, over a clip of `frames` frames."""
  slope = np.polyfit(np.asarray(t, np.float32), np.stack(pts), 1)[0]     # (2,) pixels per frame
  return slope * np.float32(frames - 1)


def motion_direction(frames: np.ndarray, color: Optional[str] = None, *, min_displacement: float = 2.0,
                     **kw) -> Optional[str]:
  """Dominant direction of motion ("left"/"right"/"up"/"down"), None if static or not found."""
  d = motion_displacement(frames, color, **kw)
  if d is None or float(np.abs(d).max()) < min_displacement:
    return None
  return _dominant_direction(float(d[0]), float(d[1]))


def _largest_component(mask: np.ndarray) -> np.ndarray:
  """(H, W) bool mask of the largest 4-connected region of `mask` (all False when it is empty)."""
  # scipy is not a dependency: label by propagation instead. Each mask pixel starts with its own
  # flat index; every pass takes the smallest label among itself and its 4 neighbours, then jumps
  # to its label's label (still a pixel of the same region, so it stays valid and converges fast).
  h, w = mask.shape
  none = h * w
  lab = np.where(mask, np.arange(none).reshape(h, w), none)
  while True:
    p = np.pad(lab, 1, constant_values=none)
    new = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
    new = np.where(mask, new, none)
    new[mask] = new.flat[new[mask]]
    if np.array_equal(new, lab):
      break
    lab = new
  if not mask.any():
    return mask
  return lab == np.bincount(lab[mask]).argmax()


def clip_coherence(frames: np.ndarray, *, min_present: int = 14, min_pixels: int = 12,
                   max_fraction: float = 0.25, min_share: float = 0.8, max_area_ratio: float = 2.0,
                   min_monotone: float = 0.8, step_tolerance: float = 0.5, min_travel: float = 0.15,
                   jump_factor: float = 4.0, max_step: float = 0.15, **kw) -> dict:
  """Whether a (generated) clip shows one object moving steadily one way, tracked colour-blind.

  clip_coherence(frames, *, min_present=14, min_pixels=12, max_fraction=0.25, min_share=0.8,
                 max_area_ratio=2.0, min_monotone=0.8, step_tolerance=0.5, min_travel=0.15,
                 jump_factor=4.0, max_step=0.15, **kw) -> dict
  frames: (F, H, W, 3) uint8, or floats in model range [-1, 1]; `kw` goes to `object_mask`.

  Per frame, the object is the largest 4-connected region of `object_mask(frame)` (saturation).
  A frame is *present* when that region has `min_pixels`..`max_fraction` of the frame, and shows
  *one object* when the region also holds >= `min_share` of the saturated pixels. Coherent when
  (checked in this order; `reason` names the first that fails, "" when coherent):
  - "object missing": fewer than `min_present` frames (default for F=16) are present;
  - "several objects": fewer than `min_present` frames show one object;
  - "size unstable": object area max / min over those frames > `max_area_ratio`;
  - "not monotone": fewer than `min_monotone` of the steps between them along the dominant axis
    go the way of the overall displacement (steps within +-`step_tolerance` px are fine);
  - "no displacement": |dominant-axis displacement| < `min_travel` frame sizes (rendered clips
    travel 0.3-0.5);
  - "jump": a per-frame step longer than `jump_factor` x the median and `max_step` frame sizes.
  "Frame size" is the frame's extent along the dominant axis.

  Returns {"coherent": bool, "present": int, "direction": str or None (None without a clear
  displacement), "displacement": (dx, dy) first to last frame from a line fit through the
  one-object frames' centroids (pixels; None when not fitted), "reason": str}.
  """
  frames = np.asarray(frames)
  present, t, pts, areas = 0, [], [], []
  for i, frame in enumerate(frames):
    mask = object_mask(frame, **kw)
    comp = _largest_component(mask)
    n = int(comp.sum())
    if not min_pixels <= n <= max_fraction * mask.size:
      continue                       # nothing, a speck, or saturated noise everywhere
    present += 1
    if n < min_share * mask.sum():
      continue                       # a second object (or clutter): the centroid would be ambiguous
    ys, xs = np.nonzero(comp)
    t.append(i)
    pts.append(np.array([xs.mean(), ys.mean()], np.float32))
    areas.append(n)
  out = {"coherent": False, "present": present, "direction": None, "displacement": None}
  if present < min_present:
    return {**out, "reason": f"object missing ({present}/{len(frames)} frames present)"}
  if len(t) < max(min_present, 2):
    return {**out, "reason": f"several objects (one object in {len(t)}/{len(frames)} frames)"}
  d = _fit_displacement(t, pts, len(frames))
  axis = int(abs(d[1]) > abs(d[0]))            # 0: x, 1: y (ties go to x, as in _dominant_direction)
  size = frames.shape[2 - axis]                # W for x, H for y
  out["displacement"] = (float(d[0]), float(d[1]))
  clear = abs(float(d[axis])) >= min_travel * size
  if clear:
    out["direction"] = _dominant_direction(float(d[0]), float(d[1]))
  # Steps between consecutive one-object frames, per frame of the gap they span: a step over a
  # missing frame is not a jump.
  steps = np.diff(np.stack(pts), axis=0) / np.diff(t)[:, None]
  along = steps[:, axis] * np.sign(d[axis])    # > 0: the overall way
  lengths = np.linalg.norm(steps, axis=1)
  if max(areas) > max_area_ratio * min(areas):
    reason = f"size unstable (area {min(areas)}..{max(areas)} px)"
  elif np.mean(along >= -step_tolerance) < min_monotone:
    reason = f"not monotone ({int(np.sum(along < -step_tolerance))}/{len(along)} steps back)"
  elif not clear:
    reason = f"no displacement ({abs(float(d[axis])):.1f} px)"
  elif np.any((lengths > jump_factor * np.median(lengths)) & (lengths > max_step * size)):
    reason = f"jump ({float(lengths.max()):.1f} px step, median {float(np.median(lengths)):.1f})"
  else:
    reason = ""
  return {**out, "coherent": not reason, "reason": reason}
