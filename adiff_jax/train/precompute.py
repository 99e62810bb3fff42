"""Pre-computes VAE latents (and optionally CLIP text embeddings) for training.

`python -m adiff_jax.train.precompute --config configs/training/X.yaml --out DIR [--text]` runs
the configured source through the training clip sampling (one deterministic clip per example:
start, flip and caption drawn from (seed, index); no caption dropout, that happens at training
time) and encodes each clip with the run's frozen VAE. What is stored is the *scaled* posterior
mean and std, not a sample, so training still draws a fresh latent per step
(mean + std * eps, like `latent_dist.sample() * scaling_factor`). The directory layout and its
reader: `adiff_jax.data.precomputed`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from adiff_jax.data.loader import ClipTransform, for_source
from adiff_jax.data.precomputed import FIELDS, FORMAT, STORE_DTYPE, PrecomputedSource  # noqa: F401
from adiff_jax.errors import InputError
from adiff_jax.tokenizer import CLIPTokenizer
from adiff_jax.train.config import load_config, to_dict
from adiff_jax.train.inputs import clip_config, make_source
from adiff_jax.train.state import load_base
from adiff_jax.train.step import make_spec


def model_sha(model: str) -> Optional[str]:
  """sha256 over the relative paths and bytes of every file of a model dir (None for "tiny")."""
  if not os.path.isdir(model):
    return None
  h = hashlib.sha256()
  for root, dirs, files in os.walk(model):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      h.update(os.path.relpath(path, model).encode())
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
  return h.hexdigest()


def sampled_clips(source, clip, seed: int, num: int) -> Iterator[tuple[int, dict]]:
  """(index, {"video", "text"}) for the first `num` records, one clip each from
  np.random.default_rng([seed, index]); skipped records (unreadable, too short) yield a marker."""
  transform = ClipTransform(dataclasses.replace(for_source(clip, source), empty_text_prob=0.0))
  for i in range(num):
    yield i, transform.random_map(source[i], np.random.default_rng([seed, i]))


def make_encoders(cfg, base):
  """Jitted (vae_params, frames (N, H, W, 3)) -> scaled (mean, std), and (text_params, ids) ->
  embeddings, with the same modules (and dtype) as the training step."""
  spec = make_spec(cfg, base.config)
  s = spec.vae.config.scaling_factor

  @jax.jit
  def encode(params, frames):
    post = spec.vae.apply({"params": params}, frames, method=type(spec.vae).encode)
    f32 = lambda x: x.astype(jnp.float32) * s
    return f32(post.mean), f32(post.std)

  @jax.jit
  def embed(params, ids):
    return spec.text.apply({"params": params}, ids).astype(jnp.float32)
  return encode, embed


class _ShardWriter:
  """Collects encoded examples and writes them `shard_size` at a time."""

  def __init__(self, directory: str, shard_size: int):
    self.directory, self.shard_size = directory, shard_size
    self.buf: dict[str, list] = {}
    self.shards: list[dict] = []

  def add(self, rec: dict) -> None:
    for k, v in rec.items():
      self.buf.setdefault(k, []).append(v)
    if len(self.buf["text"]) >= self.shard_size:
      self.flush()

  def flush(self) -> None:
    if not self.buf.get("text"):
      return
    name = f"shard_{len(self.shards):05d}"
    for k, vs in self.buf.items():
      arr = np.array(vs) if k == "text" else np.stack(vs).astype(STORE_DTYPE)
      np.save(os.path.join(self.directory, f"{name}.{k}.npy"), arr, allow_pickle=False)
    self.shards.append({"name": name, "count": len(self.buf["text"])})
    self.buf = {}


def _encode_batch(encode, embed, params, tokenizer, batch: list[dict], batch_size: int,
                  text: bool) -> list[dict]:
  """Encodes up to `batch_size` clips; pads to `batch_size` so there is a single compile."""
  n = len(batch)
  video = np.stack([b["video"] for b in batch])
  video = np.concatenate([video, np.zeros((batch_size - n,) + video.shape[1:], video.dtype)])
  frames = video.reshape((-1,) + video.shape[2:])
  mean, std = (np.asarray(a).reshape(video.shape[:2] + a.shape[1:])[:n]
               for a in encode(params["vae"], frames))
  captions = [b["text"] for b in batch]
  out = [{"latent_mean": mean[i], "latent_std": std[i], "text": captions[i]} for i in range(n)]
  if text:
    ids = tokenizer(captions + [""] * (batch_size - n))
    emb = np.asarray(embed(params["text_encoder"], ids))
    for i in range(n):
      out[i]["text_emb"] = emb[i]
  return out


def precompute(cfg, out_dir: str, *, num_examples: Optional[int] = None, text: bool = False,
               batch_size: int = 8, shard_size: int = 1024, seed: int = 0,
               progress: bool = True) -> dict:
  """Encodes the first `num_examples` records (all by default) of `cfg.data`'s source into
  `out_dir` (which must not exist). Returns the manifest."""
  from tqdm.auto import tqdm
  if os.path.exists(out_dir):
    raise FileExistsError(f"{out_dir} exists; remove it or choose another --out")
  if cfg.stage == "vae":
    raise InputError("the vae stage trains the VAE: its inputs cannot be pre-encoded")
  source, clip, base = make_source(cfg.data), clip_config(cfg), load_base(cfg)
  num = len(source) if num_examples is None else min(num_examples, len(source))
  encode, embed = make_encoders(cfg, base)
  tokenizer = CLIPTokenizer.default()
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".precompute-", dir=parent)  # same filesystem: rename is atomic
  try:
    writer, skipped, batch = _ShardWriter(tmp, shard_size), {}, []
    for _, ex in tqdm(sampled_clips(source, clip, seed, num), total=num, desc="precompute",
                      unit="clip", disable=not progress):
      if "video" not in ex:
        skipped[ex["_skip"]] = skipped.get(ex["_skip"], 0) + 1
        continue
      batch.append(ex)
      if len(batch) == batch_size:
        for rec in _encode_batch(encode, embed, base.params, tokenizer, batch, batch_size, text):
          writer.add(rec)
        batch = []
    if batch:
      for rec in _encode_batch(encode, embed, base.params, tokenizer, batch, batch_size, text):
        writer.add(rec)
    writer.flush()
    if text:
      empty = np.asarray(embed(base.params["text_encoder"], tokenizer([""])))[0]
      np.save(os.path.join(tmp, "empty_text_emb.npy"), empty.astype(STORE_DTYPE))
    manifest = _manifest(cfg, base, clip, writer.shards, skipped, num, text, seed, to_dict)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
      json.dump(manifest, f, indent=2)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def _manifest(cfg, base, clip, shards, skipped, num, text, seed, to_dict) -> dict:
  return {
      "format": FORMAT,
      "num_records": sum(s["count"] for s in shards),
      "num_source_examples": num,
      "skipped": skipped,
      "shards": shards,
      "dtype": np.dtype(STORE_DTYPE).name,
      "scaling_factor": base.config.vae.scaling_factor,
      "num_frames": clip.num_frames,
      "sample_size": list(clip.size_hw),
      "text_embeddings": bool(text),
      "clip_seed": seed,
      "model": cfg.model,
      "model_sha256": model_sha(cfg.model),
      "config": to_dict(cfg),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="training YAML (its data + model are used)")
  p.add_argument("--out", required=True, help="output folder (must not exist)")
  p.add_argument("--num-examples", type=int, default=None, help="first N records (default: all)")
  p.add_argument("--text", action="store_true", help="also store CLIP text embeddings")
  p.add_argument("--batch-size", type=int, default=8, help="clips per encoder call")
  p.add_argument("--shard-size", type=int, default=1024, help="records per shard file")
  p.add_argument("--seed", type=int, default=0, help="clip-sampling seed")
  p.add_argument("overrides", nargs="*", help="config key=value overrides")
  a = p.parse_args(argv)
  cfg = load_config(a.config, a.overrides)
  m = precompute(cfg, a.out, num_examples=a.num_examples, text=a.text, batch_size=a.batch_size,
                 shard_size=a.shard_size, seed=a.seed)
  print(f"wrote {m['num_records']} records ({m['skipped'] or 'none'} skipped) to {a.out}")
  return 0


if __name__ == "__main__":
  import sys
  from adiff_jax.errors import run_cli
  sys.exit(run_cli(main))
