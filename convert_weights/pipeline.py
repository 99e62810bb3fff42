"""The two conversions the CLI offers, as functions: PyTorch files -> Orbax dir, and back."""
from __future__ import annotations

from typing import Optional, Sequence

import ml_dtypes
import numpy as np

from convert_weights import base, lora_files, motion, orbax_io
from convert_weights.base import config_dict
from convert_weights.errors import ConversionError
from convert_weights.tree import flatten, unflatten

DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16, "keep": None}


def cast_tree(tree: dict, dtype: Optional[str], skip_leaf: Sequence[str] = ()) -> dict:
  """Floating leaves to `dtype` ("fp32" | "fp16" | "bf16"; "keep"/None: unchanged)."""
  target = DTYPES.get(dtype or "keep", "bad")
  if isinstance(target, str):
    raise ConversionError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
  if target is None:
    return tree
  out = {}
  for k, v in flatten(tree).items():
    floating = np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16
    out[k] = v.astype(target) if floating and k.rsplit("/", 1)[-1] not in skip_leaf else v
  return unflatten(out)


def _dtypes(tree: dict) -> list[str]:
  return sorted({str(np.asarray(v).dtype) for v in flatten(tree).values()})


def to_orbax(out: str, base_path: Optional[str] = None, motion_module: Optional[str] = None,
             motion_loras: Sequence[tuple[str, float]] = (), domain_adapter: Optional[tuple[str, float]] = None,
             loras: Sequence[tuple[str, float]] = (), dtype: str = "keep", kohya_scaling: bool = False,
             mm_version: Optional[str] = None, overrides: Optional[dict] = None,
             overwrite: bool = False, progress: Optional[bool] = None, log=print) -> dict:
  """Convert any subset of (base model, motion module, MotionLoRAs, domain adapter, kohya LoRAs)
  into one Orbax model dir. overrides: {"unet"|"vae"|"text_encoder"|"motion_module": {field: value}}
  for config fields the weights cannot tell (heads, GroupNorm groups). Returns the metadata."""
  if not any([base_path, motion_module, motion_loras, domain_adapter]):
    raise ConversionError("nothing to convert: give --base, --motion-module, --motion-lora or --domain-adapter")
  if loras and not base_path:
    raise ConversionError("--lora (kohya) is merged into the base model: it needs --base")
  overrides = overrides or {}
  items, notes = {}, []
  meta: dict = {"dtype": dtype, "versions": {}, "configs": {}, "sources": {}, "formats": {}, "extras": {}}

  def add_extras(name, extras):
    if extras:
      items[f"extras_{name}"], meta["extras"][f"extras_{name}"] = orbax_io.extras_to_item(extras)

  if base_path:
    log(f"reading base model {base_path}")
    info = {}
    b = base.load_base_model(base_path, info=info, progress=progress, overrides=overrides)
    notes += info.get("notes", [])
    unet, text = b["unet"], b.get("text_encoder")
    for path, alpha in loras:
      log(f"merging kohya LoRA {path} (multiplier {alpha}, {'kohya alpha/rank' if kohya_scaling else 'official'} scaling)")
      linfo = {}
      unet, text = lora_files.merge_kohya_lora(unet, text, path, alpha, kohya_scaling, linfo)
      notes += linfo.get("notes", [])
      meta.setdefault("kohya_loras", []).append({"source": orbax_io.source_record(path), "alpha": alpha,
                                                 "scaling": "kohya" if kohya_scaling else "official"})
    items["unet"] = cast_tree(unet, dtype)
    meta["configs"]["unet"] = config_dict(b["unet_config"])
    if text is not None:
      items["text_encoder"] = cast_tree(text, dtype)
      meta["configs"]["text_encoder"] = config_dict(b["text_config"])
    if "vae" in b:
      items["vae"] = cast_tree(b["vae"], dtype)
      meta["configs"]["vae"] = config_dict(b["vae_config"])
    meta["sources"]["base"] = orbax_io.source_record(base_path)
    meta["formats"]["base"] = b["format"]
    add_extras("base", b["extras"])

  mm_tree = None
  if motion_module:
    log(f"reading motion module {motion_module}")
    info = {}
    ov = overrides.get("motion_module", {})
    mm_tree, cfg, version = motion.load_motion_module(
        motion_module, mm_version, ov.get("num_heads"), ov.get("norm_groups"), info=info, progress=progress)
    notes += info.get("notes", [])
    items["motion_module"] = cast_tree(mm_tree, dtype)
    meta["configs"]["motion_module"] = config_dict(cfg)
    meta["versions"]["motion_module"] = version
    meta["formats"]["motion_module"] = info["format"]
    meta["motion_module_had_pe"] = bool(info["extras"])
    meta["sources"]["motion_module"] = orbax_io.source_record(motion_module)
    add_extras("motion_module", info["extras"])
    log(f"motion module: {version}, pe length {cfg.max_len}, mid block {cfg.mid_block}")

  for i, (path, alpha) in enumerate(motion_loras):
    log(f"reading MotionLoRA {path} (alpha {alpha})")
    tree = lora_files.load_motion_lora(path, alpha)
    if mm_tree is not None:
      lora_files.check_lora_targets(tree, mm_tree, path)
    name = f"motion_lora_{i}"
    items[name] = cast_tree(tree, dtype, skip_leaf=("scale",))
    meta.setdefault("motion_loras", []).append({"item": name, "alpha": alpha})
    meta["sources"][name] = orbax_io.source_record(path)

  if domain_adapter:
    path, scale = domain_adapter
    log(f"reading domain adapter {path} (scale {scale})")
    tree = lora_files.load_domain_adapter(path, scale)
    if "unet" in items:
      lora_files.check_lora_targets(tree, items["unet"], path)
    items["domain_adapter"] = cast_tree(tree, dtype, skip_leaf=("scale",))
    meta["domain_adapter"] = {"item": "domain_adapter", "scale": scale}
    meta["sources"]["domain_adapter"] = orbax_io.source_record(path)

  meta["notes"] = notes
  meta["tensor_dtypes"] = {n: _dtypes(t) for n, t in items.items()}
  log(f"writing {out} ({', '.join(sorted(items))})")
  orbax_io.save_model_dir(out, items, meta, overwrite=overwrite)
  return meta


WHAT = ("motion_module", "motion_lora", "domain_adapter", "ldm")


def to_torch(model_dir: str, what: str, out: str, fmt: str = "original", item: Optional[str] = None,
             log=print) -> None:
  """Export one part of an Orbax model dir: motion_module (original file or diffusers folder),
  motion_lora / domain_adapter (original processor-LoRA file), ldm (single-file UNet+VAE+CLIP)."""
  meta = orbax_io.read_metadata(model_dir)
  if what not in WHAT:
    raise ConversionError(f"unknown --what {what!r}; choose from {', '.join(WHAT)}")
  if fmt not in ("original", "diffusers"):
    raise ConversionError(f"unknown --format {fmt!r}; choose original or diffusers")
  if fmt == "diffusers" and what != "motion_module":
    raise ConversionError(f"--format diffusers is only available for motion_module (not {what})")
  if what == "motion_module":
    extras_keys = meta.get("extras", {}).get("extras_motion_module", [])
    names = ["motion_module"] + (["extras_motion_module"] if extras_keys else [])
    trees, _ = orbax_io.load_model_dir(model_dir, names)
    extras = orbax_io.extras_from_item(trees["extras_motion_module"], extras_keys) if extras_keys else {}
    motion.export_motion_module(trees["motion_module"], orbax_io.motion_config_from_meta(meta), out, fmt,
                                extras=extras, with_pe=meta.get("motion_module_had_pe"))
  elif what in ("motion_lora", "domain_adapter"):
    name = item or ("motion_lora_0" if what == "motion_lora" else "domain_adapter")
    trees, _ = orbax_io.load_model_dir(model_dir, [name])
    lora_files.export_lora(trees[name], out)
  else:
    present = [n for n in ("unet", "vae", "text_encoder") if n in meta.get("items", [])]
    if "unet" not in present:
      raise ConversionError(f"{model_dir}: has no unet item to export as LDM")
    extras_keys = meta.get("extras", {}).get("extras_base", [])
    trees, _ = orbax_io.load_model_dir(model_dir, present + (["extras_base"] if extras_keys else []))
    extras = orbax_io.extras_from_item(trees["extras_base"], extras_keys) if extras_keys else {}
    base.export_ldm(out, trees["unet"], trees.get("vae"), trees.get("text_encoder"), extras)
  log(f"wrote {out}")
