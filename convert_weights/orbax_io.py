"""Orbax model directories: named items plus `metadata.json`, written atomically.

    out_dir/
      metadata.json      versions, model configs, sources (+ sha256), converter version, items
      unet/              Orbax PyTree items (numpy arrays on restore), one per model part:
      motion_module/     unet, motion_module, text_encoder, vae, motion_lora_<i>,
      ...                domain_adapter, extras_<part> (buffers kept only for exact export)

Everything is written into `.<name>.tmp-<pid>` beside `out_dir` and renamed at the end, so
`out_dir` either does not exist or is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Iterable, Optional

import numpy as np

from adiff_jax.clip_text import CLIPTextConfig
from adiff_jax.motion_module import MotionModuleConfig
from adiff_jax.unet import UNetConfig
from adiff_jax.vae import VAEConfig
from convert_weights.base import config_from_dict
from convert_weights.errors import ConversionError

CONVERTER_VERSION = "1"
METADATA = "metadata.json"


def sha256(path: str, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while b := f.read(chunk):
      h.update(b)
  return h.hexdigest()


def source_record(path: str) -> dict:
  """{path, sha256} of a file, or of every weights file in a folder."""
  if os.path.isdir(path):
    files = []
    for root, _, names in sorted(os.walk(path)):
      for n in sorted(names):
        if n.endswith((".safetensors", ".bin", ".ckpt", ".pt", ".pth")):
          p = os.path.join(root, n)
          files.append({"file": os.path.relpath(p, path), "sha256": sha256(p)})
    return {"path": os.path.basename(os.path.normpath(path)), "files": files}
  return {"path": os.path.basename(path), "sha256": sha256(path)}


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer()


def _write_item(path: str, tree: Any) -> None:
  _checkpointer().save(path, tree)


def save_model_dir(out_dir: str, items: dict[str, Any], metadata: dict,
                   overwrite: bool = False) -> None:
  """Write named pytrees (numpy / jax arrays) and metadata.json atomically (see module doc)."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise ConversionError(f"{out_dir}: already exists (use --overwrite to replace it)")
  bad = [n for n in items if not n or n == METADATA or "/" in n or n.startswith(".")]
  if bad:
    raise ConversionError(f"invalid item names: {bad}")
  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    for item, tree in items.items():
      _write_item(os.path.join(tmp, item), tree)
    meta = {"converter_version": CONVERTER_VERSION, **metadata, "items": sorted(items)}
    with open(os.path.join(tmp, METADATA), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True, default=_json_default)
    if os.path.exists(out_dir):  # overwrite: move the old one aside only now
      old = os.path.join(parent, f".{name}.old-{os.getpid()}")
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _json_default(o):
  if isinstance(o, (np.integer, np.floating)):
    return o.item()
  if isinstance(o, (tuple, set)):
    return list(o)
  return str(o)


def read_metadata(model_dir: str) -> dict:
  p = os.path.join(model_dir, METADATA)
  if not os.path.isfile(p):
    raise ConversionError(f"{model_dir}: not a converted model directory (no {METADATA})")
  with open(p) as f:
    return json.load(f)


def load_model_dir(model_dir: str, items: Optional[Iterable[str]] = None) -> tuple[dict, dict]:
  """({item: pytree of numpy arrays}, metadata). items=None loads every item."""
  model_dir = os.path.abspath(model_dir)
  meta = read_metadata(model_dir)
  names = list(meta.get("items", [])) if items is None else list(items)
  missing = [n for n in names if not os.path.isdir(os.path.join(model_dir, n))]
  if missing:
    raise ConversionError(f"{model_dir}: no item(s) {', '.join(missing)}; it has "
                          f"{', '.join(meta.get('items', [])) or 'none'}")
  ckptr = _checkpointer()
  return {n: ckptr.restore(os.path.join(model_dir, n)) for n in names}, meta


def _config(meta: dict, name: str, cls):
  cfg = meta.get("configs", {}).get(name)
  if cfg is None:
    raise ConversionError(f"metadata has no {name} config")
  return config_from_dict(cls, cfg)


def unet_config_from_meta(meta: dict) -> UNetConfig:
  return _config(meta, "unet", UNetConfig)


def motion_config_from_meta(meta: dict) -> MotionModuleConfig:
  return _config(meta, "motion_module", MotionModuleConfig)


def vae_config_from_meta(meta: dict) -> VAEConfig:
  return _config(meta, "vae", VAEConfig)


def text_config_from_meta(meta: dict) -> CLIPTextConfig:
  return _config(meta, "text_encoder", CLIPTextConfig)


def extras_to_item(extras: dict) -> tuple[dict, list[str]]:
  """Flat {torch key: array} -> (an Orbax-safe tree {"t0": ...}, the key list for metadata)."""
  keys = sorted(extras)
  return {f"t{i}": np.asarray(extras[k]) for i, k in enumerate(keys)}, keys


def extras_from_item(tree: dict, keys: list[str]) -> dict:
  return {k: tree[f"t{i}"] for i, k in enumerate(keys)}
