"""Model directories on disk, and the one model loader.

    model_dir/
      metadata.json      versions, configs (architecture only), sources, items
      unet/              Orbax PyTree items (numpy arrays on restore), one per part:
      motion_module/     unet (image UNet), motion_module, text_encoder, vae,
      ...                text_encoder_2 (SDXL), motion_lora_<i>, domain_adapter,
                         extras_<part> (for exact export)

`python -m convert_weights to-orbax` writes them from PyTorch files, `train.py` exports them,
`load` reads them for sampling, training and the benchmarks. Writes are atomic: everything goes
into `.<name>.tmp-<pid>` beside the target and is renamed at the end.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from adiff_jax import lora as lora_lib
from adiff_jax.clip_text import CLIPTextConfig
from adiff_jax.config_io import from_dict, to_dict
from adiff_jax.errors import InputError
from adiff_jax.model import ALL_PARTS, ModelConfig, PARTS
from adiff_jax.motion_module import MotionModuleConfig, merge_motion_module, split_motion_module
from adiff_jax.params import flatten
from adiff_jax.unet import UNetConfig
from adiff_jax.vae import VAEConfig

FORMAT_VERSION = "1"
METADATA = "metadata.json"
CONFIG_CLASSES = {"unet": UNetConfig, "motion_module": MotionModuleConfig,
                  "text_encoder": CLIPTextConfig, "text_encoder_2": CLIPTextConfig, "vae": VAEConfig}
# Keys that directories written before configs became architecture-only may carry: ignored.
_LEGACY_KEYS = frozenset({"dtype", "param_dtype"})


# ---------------------------------------------------------------------------------------------
# The directory: items + metadata.json


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer()


def _write_item(path: str, tree: Any) -> None:
  _checkpointer().save(path, tree)


def _json_default(o):
  if isinstance(o, (np.integer, np.floating)):
    return o.item()
  if isinstance(o, (tuple, set)):
    return list(o)
  return str(o)


def save(out_dir: str, items: dict[str, Any], metadata: dict, overwrite: bool = False) -> None:
  """Write named pytrees (numpy / jax arrays) and metadata.json atomically (see module doc)."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise InputError(f"{out_dir}: already exists (use --overwrite to replace it)")
  bad = [n for n in items if not n or n == METADATA or "/" in n or n.startswith(".")]
  if bad:
    raise InputError(f"invalid item names: {bad}")
  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    for item, tree in items.items():
      _write_item(os.path.join(tmp, item), tree)
    meta = {"converter_version": FORMAT_VERSION, **metadata, "items": sorted(items)}
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


def is_model_dir(path: Optional[str]) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, METADATA))


def read_metadata(model_dir: str) -> dict:
  p = os.path.join(model_dir, METADATA)
  if not os.path.isfile(p):
    raise InputError(f"{model_dir}: not a model directory (no {METADATA}); convert PyTorch files "
                     "with `python -m convert_weights to-orbax`")
  try:
    with open(p) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{p}: unreadable metadata ({e})") from None


def load_items(model_dir: str, items: Optional[Iterable[str]] = None) -> tuple[dict, dict]:
  """({item: pytree of numpy arrays}, metadata). items=None loads every item."""
  model_dir = os.path.abspath(model_dir)
  meta = read_metadata(model_dir)
  names = list(meta.get("items", [])) if items is None else list(items)
  missing = [n for n in names if not os.path.isdir(os.path.join(model_dir, n))]
  if missing:
    raise InputError(f"{model_dir}: no item(s) {', '.join(missing)}; it has "
                     f"{', '.join(meta.get('items', [])) or 'none'}")
  ckptr = _checkpointer()
  out = {}
  for n in names:
    try:
      out[n] = ckptr.restore(os.path.join(model_dir, n))
    except Exception as e:  # Orbax raises many types for a damaged item
      raise InputError(f"{model_dir}: item {n!r} is unreadable ({type(e).__name__}: {e})") from None
  return out, meta


def config_of(meta: dict, part: str, where: str = "metadata.json"):
  """The config of `part` ("unet", "motion_module", "text_encoder", "text_encoder_2", "vae") in a
  model dir's metadata."""
  cfg = meta.get("configs", {}).get(part)
  if cfg is None:
    raise InputError(f"{where}: no {part} config")
  return from_dict(CONFIG_CLASSES[part], cfg, where, f"{part}.", ignore=_LEGACY_KEYS)


def configs_metadata(config: ModelConfig) -> dict:
  """The "configs" section of metadata.json for a whole model."""
  out = {"unet": to_dict(config.unet), "text_encoder": to_dict(config.text), "vae": to_dict(config.vae)}
  if config.text_2 is not None:
    out["text_encoder_2"] = to_dict(config.text_2)
  if config.motion is not None:
    out["motion_module"] = to_dict(config.motion)
  return out


def extras_to_item(extras: dict) -> tuple[dict, list[str]]:
  """Flat {torch key: array} -> (an Orbax-safe tree {"t0": ...}, the key list for metadata)."""
  keys = sorted(extras)
  return {f"t{i}": np.asarray(extras[k]) for i, k in enumerate(keys)}, keys


def extras_from_item(tree: dict, keys: list[str]) -> dict:
  return {k: tree[f"t{i}"] for i, k in enumerate(keys)}


# ---------------------------------------------------------------------------------------------
# The one loader


def _loras_of(model_dir: str) -> list[dict]:
  """The MotionLoRA / domain-adapter items of a model dir (their alphas are in their `scale`)."""
  meta = read_metadata(model_dir)
  names = [n for n in meta.get("items", []) if n.startswith("motion_lora") or n == "domain_adapter"]
  return list(load_items(model_dir, names)[0].values()) if names else []


def load(path: str, motion_module: Optional[str] = None,
         motion_loras: Sequence[tuple[str, float]] = (),
         domain_adapter: Optional[tuple[str, float]] = None,
         parts: Sequence[str] = PARTS) -> tuple[ModelConfig, dict, Optional[dict], dict]:
  """A model dir -> (ModelConfig, params {"unet", "text_encoder", "vae"[, "text_encoder_2"]}, lora,
  metadata). An SDXL dir's "text_encoder_2" item is loaded whenever present (config.text_2).

  motion_module: a model dir holding a `motion_module` item, used instead of `path`'s own.
  motion_loras / domain_adapter: (model dir, alpha) pairs, applied on top of any LoRA items
    `path` carries (alpha multiplies the strength stored with the LoRA).
  parts: the parts that must be present (a motion-module-only dir can be loaded with ()).
  The UNet tree holds the motion module when there is one (config.motion is None otherwise);
  lora is the combined "lora" collection, or None.
  """
  for p in [path, motion_module] + [d for d, _ in motion_loras] + ([domain_adapter[0]] if domain_adapter else []):
    if p and not os.path.exists(p):
      raise InputError(f"not found: {p}")
  meta = read_metadata(path)
  where = os.path.join(path, METADATA)
  have = meta.get("items", [])
  missing = [p for p in parts if p not in have]
  if missing:
    raise InputError(f"{path}: no {', '.join(missing)} item(s) (it has {', '.join(have) or 'none'}); "
                     "a full base model is needed (python -m convert_weights to-orbax --base ...)")
  items, _ = load_items(path, [p for p in ALL_PARTS + ("motion_module",) if p in have])
  mm_dir, mm_meta = (motion_module, read_metadata(motion_module)) if motion_module else (path, meta)
  if motion_module:
    items["motion_module"] = load_items(motion_module, ["motion_module"])[0]["motion_module"]
  motion = None
  unet = items.get("unet", {})
  if "motion_module" in items:
    motion = config_of(mm_meta, "motion_module", os.path.join(mm_dir, METADATA))
    # The motion-module item replaces whatever motion module the unet item may hold.
    unet = merge_motion_module(split_motion_module(unet)[0], items["motion_module"])
  config = ModelConfig(
      config_of(meta, "unet", where) if "unet" in items else None, motion,
      config_of(meta, "text_encoder", where) if "text_encoder" in items else None,
      config_of(meta, "vae", where) if "vae" in items else None,
      config_of(meta, "text_encoder_2", where) if "text_encoder_2" in items else None)
  params = {"unet": unet, "text_encoder": items.get("text_encoder"), "vae": items.get("vae"),
            "text_encoder_2": items.get("text_encoder_2")}
  if (config.unet is not None and config.unet.addition_embed_type and "text_encoder" in parts
      and config.text_2 is None):
    raise InputError(f"{path}: an SDXL UNet but no text_encoder_2 item (it has {', '.join(have)}); "
                     "convert the whole SDXL base model (python -m convert_weights to-orbax --base ...)")
  params = {k: v for k, v in params.items() if v is not None and (k != "unet" or flatten(v))}

  adapters = [(t, 1.0, path) for t in _loras_of(path)]
  for d, alpha in list(motion_loras) + ([domain_adapter] if domain_adapter else []):
    adapters += [(t, float(alpha), d) for t in _loras_of(d)]
  if "unet" in params:
    for t, _, d in adapters:
      lora_lib.check_lora_fits(t, params["unet"], d)
  adapters = [(t, a) for t, a, _ in adapters]
  lora = lora_lib.combine_loras(adapters) if adapters else None
  return config, params, lora, meta
