"""Prompt travel: keyframed prompts whose text embeddings are interpolated frame by frame.

A travelling prompt is a mapping {frame: text}. As in diffusers' AnimateDiff (FreeNoise
`_encode_prompt_free_noise`): the keyframes are sorted, the last keyframe's text also holds at
frame N-1, and frames between two keyframes i < j get the embedding lerped with
alpha = (f - i) / (j - i). Comfy and sd-webui offer slerp too (`method="slerp"`: of whole
(77, D) embeddings, falling back to lerp when they are almost parallel, as sd-webui does).

Text form (sd-webui-animatediff / Comfy prompt-travel style), one item per line:

    masterpiece, best quality          <- head: added before every keyframe's text
    0: a red circle
    16: a blue square
    highly detailed                    <- tail: added after every keyframe's text

Keyframe lines are `N: text` (N a frame number, increasing); " | " separates items as a newline
does. A prompt without keyframe lines is a plain prompt.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from adiff_jax.errors import InputError

METHODS = ("lerp", "slerp")
Prompt = Union[str, Mapping[int, str]]

_KEYFRAME = re.compile(r"^\s*(-?\d+)\s*:\s*(.*)$")


def parse(text: str) -> Prompt:
  """A prompt text -> the text itself, or {frame: text} when it has `N: text` lines."""
  if not isinstance(text, str):
    raise InputError(f"a prompt must be text, got {type(text).__name__}")
  # Lines, or items separated by " | " (handier on a command line).
  lines = [ln.strip() for part in text.splitlines() for ln in part.split(" | ") if ln.strip()]
  if not any(_KEYFRAME.match(ln) for ln in lines):
    return text
  head, tail, frames = [], [], {}
  last = None
  for ln in lines:
    m = _KEYFRAME.match(ln)
    if m is None:
      (tail if frames else head).append(ln)
      continue
    f = int(m.group(1))
    if last is not None and f <= last:
      raise InputError(f"prompt keyframes must increase: frame {f} comes after frame {last}")
    frames[f] = m.group(2).strip()
    last = f
  def join(*parts):
    return ", ".join(p.strip(" ,") for p in parts if p.strip(" ,"))
  return {f: join(*head, t, *tail) for f, t in frames.items()}


def check(prompt: Prompt, num_frames: int, what: str = "prompt") -> None:
  """Keyframes must start at 0 and lie in [0, num_frames)."""
  if isinstance(prompt, str):
    return
  if not isinstance(prompt, Mapping) or not prompt:
    raise InputError(f"a travelling {what} must be a non-empty {{frame: text}} mapping")
  for f, t in prompt.items():
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not isinstance(t, str):
      raise InputError(f"{what} keyframes must be {{int frame: str text}}, got {f!r}: {t!r}")
  frames = sorted(prompt)
  if frames[0] != 0:
    raise InputError(f"{what} keyframes must start at frame 0 (the first is {frames[0]})")
  if frames[-1] >= num_frames:
    raise InputError(f"{what} keyframe {frames[-1]} is out of range for {num_frames} frames "
                     f"(0..{num_frames - 1})")


def texts(prompt: Prompt) -> list[str]:
  """The distinct texts to encode, keyframe order."""
  if isinstance(prompt, str):
    return [prompt]
  return [prompt[f] for f in sorted(prompt)]


def frame_plan(prompt: Mapping[int, str], num_frames: int):
  """Per frame: (index of the keyframe text before, index after, alpha), as numpy arrays (F,).

  Indices refer to `texts(prompt)`; the last keyframe holds to the end."""
  check(prompt, num_frames)
  keys = sorted(prompt)
  lo, hi, alpha = (np.zeros(num_frames, np.int32), np.zeros(num_frames, np.int32),
                   np.zeros(num_frames, np.float32))
  for f in range(num_frames):
    k = max(i for i, key in enumerate(keys) if key <= f)
    if k + 1 < len(keys):
      a, b = keys[k], keys[k + 1]
      lo[f], hi[f], alpha[f] = k, k + 1, (f - a) / (b - a)
    else:
      lo[f] = hi[f] = k
  return lo, hi, alpha


def slerp(v0, v1, t, dot_threshold: float = 0.9995):
  """Spherical interpolation of (..., 77, D) embeddings taken whole (flattened), per leading
  index; lerp where the two are almost parallel (|cos| > dot_threshold)."""
  shape = v0.shape
  a = v0.reshape(shape[0], -1).astype(jnp.float32)
  b = v1.reshape(shape[0], -1).astype(jnp.float32)
  t = jnp.asarray(t, jnp.float32).reshape(-1, 1)
  cos = jnp.sum(a * b, -1, keepdims=True) / (jnp.linalg.norm(a, axis=-1, keepdims=True)
                                              * jnp.linalg.norm(b, axis=-1, keepdims=True))
  cos = jnp.clip(cos, -1.0, 1.0)
  theta = jnp.arccos(cos)
  sin = jnp.sin(theta)
  near = jnp.abs(cos) > dot_threshold
  safe = jnp.where(near, 1.0, sin)
  s0 = jnp.where(near, 1.0 - t, jnp.sin((1.0 - t) * theta) / safe)
  s1 = jnp.where(near, t, jnp.sin(t * theta) / safe)
  return (s0 * a + s1 * b).reshape(shape).astype(v0.dtype)


def per_frame(embeds, prompt: Prompt, num_frames: int, method: str = "lerp"):
  """Embeddings of `texts(prompt)` (K, 77, D) -> per-frame text context (F, 77, D)."""
  if method not in METHODS:
    raise InputError(f"unknown prompt interpolation {method!r}; expected one of {METHODS}")
  if isinstance(prompt, str):
    return jnp.broadcast_to(embeds[0], (num_frames,) + embeds.shape[1:])
  lo, hi, alpha = frame_plan(prompt, num_frames)
  e0, e1 = embeds[lo], embeds[hi]
  if method == "slerp":
    return slerp(e0, e1, alpha)
  a = jnp.asarray(alpha).reshape(-1, 1, 1)
  return ((1.0 - a) * e0.astype(jnp.float32) + a * e1.astype(jnp.float32)).astype(embeds.dtype)


def is_travelling(prompts: Sequence[Prompt]) -> bool:
  return any(not isinstance(p, str) for p in prompts)


def describe(prompt: Prompt) -> str:
  if isinstance(prompt, str):
    return prompt
  return " -> ".join(f"{f}: {prompt[f]}" for f in sorted(prompt))


def as_prompt(value) -> Prompt:
  """A CLI/YAML value -> a Prompt: text (parsed for keyframe lines) or a {frame: text} mapping
  (YAML keys may be strings of digits)."""
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      try:
        f = int(k)
      except (TypeError, ValueError):
        raise InputError(f"prompt keyframe {k!r} is not a frame number") from None
      if not isinstance(v, str):
        raise InputError(f"prompt keyframe {k}: expected text, got {v!r}")
      out[f] = v
    return out
  if not isinstance(value, str):
    raise InputError(f"a prompt must be text or a {{frame: text}} mapping, got {value!r}")
  return parse(value)
