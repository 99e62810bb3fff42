"""Reading pre-computed VAE latents (and optionally CLIP text embeddings) for training.

The directories are written by `python -m adiff_jax.train.precompute` (see there for how the
clips are drawn). Layout (written to a temporary sibling and renamed, so it is complete or absent):
  manifest.json                     config, counts, shapes, dtype, scaling factor, base sha
  shard_00000.latent_mean.npy       (n, F, h, w, 4) float16, scaled
  shard_00000.latent_std.npy        (n, F, h, w, 4) float16, scaled
  shard_00000.text.npy              (n,) unicode captions
  shard_00000.text_emb.npy          (n, 77, D) float16 (with --text)
  empty_text_emb.npy                (77, D) float16: the "" caption (with --text)
Plain .npy files rather than .npz: they memory-map, so random access reads one example.
"""
from __future__ import annotations

import bisect
import json
import os
from typing import Optional

import numpy as np

from adiff_jax.errors import InputError

FORMAT = "adiff-precomputed-v1"
STORE_DTYPE = np.float16
FIELDS = ("latent_mean", "latent_std", "text", "text_emb")


class PrecomputedSource:
  """Random-access records {"latent_mean", "latent_std": float16 (F, h, w, 4), "text": str,
  optional "text_emb": float16 (77, D)} from a `precompute` directory. Pickles cheaply (the
  memory maps are opened lazily), so grain workers can use it."""

  is_precomputed = True

  def __init__(self, directory: str):
    self.directory = str(directory)
    with open(os.path.join(self.directory, "manifest.json")) as f:
      self.manifest = json.load(f)
    if self.manifest.get("format") != FORMAT:
      raise InputError(f"{directory}: not a precomputed dataset (format {self.manifest.get('format')!r})")
    self.has_text_emb = bool(self.manifest["text_embeddings"])
    counts = [s["count"] for s in self.manifest["shards"]]
    self._starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    self._maps: dict = {}

  def __len__(self) -> int:
    return self._starts[-1]

  def _array(self, shard: int, field: str) -> np.ndarray:
    key = (shard, field)
    if key not in self._maps:
      path = os.path.join(self.directory, f"{self.manifest['shards'][shard]['name']}.{field}.npy")
      self._maps[key] = np.load(path, mmap_mode="r")
    return self._maps[key]

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    shard = bisect.bisect_right(self._starts, index) - 1
    i = index - self._starts[shard]
    fields = FIELDS if self.has_text_emb else FIELDS[:3]
    rec = {f: np.array(self._array(shard, f)[i]) for f in fields}
    rec["text"] = str(rec["text"])
    return rec

  @property
  def empty_text_emb(self) -> Optional[np.ndarray]:
    if not self.has_text_emb:
      return None
    return np.load(os.path.join(self.directory, "empty_text_emb.npy"))

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_maps"} | {"_maps": {}}
