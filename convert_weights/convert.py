"""The two conversions the CLI offers, as functions: PyTorch files -> Orbax dir, and back."""
from __future__ import annotations

from typing import Optional, Sequence

import hashlib
import os

import numpy as np

from adiff_jax import model_dir
from adiff_jax.config_io import to_dict
from adiff_jax.params import cast_tree, flatten
from convert_weights import lora_files, motion_module_files as motion, sd_base as base
from convert_weights.detect import known_file
from convert_weights.errors import ConversionError


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


def _dtypes(tree: dict) -> list[str]:
  return sorted({str(np.asarray(v).dtype) for v in flatten(tree).values()})


def to_orbax(out: str, base_path: Optional[str] = None, motion_module: Optional[str] = None,
             motion_loras: Sequence[tuple[str, float]] = (), domain_adapter: Optional[tuple[str, float]] = None,
             loras: Sequence[tuple[str, float]] = (), dtype: str = "keep",
             kohya_scaling: Optional[bool] = None,
             mm_version: Optional[str] = None, overrides: Optional[dict] = None,
             overwrite: bool = False, progress: Optional[bool] = None, log=print) -> dict:
  """Convert any subset of (base model (SD1.5 or SDXL), motion module, MotionLoRAs, domain adapter,
  kohya LoRAs) into one Orbax model dir. overrides: {"unet"|"vae"|"text_encoder"|"text_encoder_2"|
  "motion_module": {field: value}} for config fields the weights cannot tell (heads, GroupNorm
  groups). kohya_scaling: scale kohya LoRAs by their alpha/rank; None: for SDXL only (the
  official AnimateDiff merge ignores alpha/rank, but its sdxl branch has no kohya loader, so SDXL
  follows A1111 / ComfyUI / diffusers). Returns the metadata."""
  if not any([base_path, motion_module, motion_loras, domain_adapter]):
    raise ConversionError("nothing to convert: give --base, --motion-module, --motion-lora or --domain-adapter")
  if loras and not base_path:
    raise ConversionError("--lora (kohya) is merged into the base model: it needs --base")
  if os.path.exists(out) and not overwrite:     # before reading anything
    raise ConversionError(f"{os.path.abspath(out)}: already exists (use --overwrite to replace it)")
  overrides = overrides or {}
  items, notes = {}, []
  meta: dict = {"dtype": dtype, "versions": {}, "configs": {}, "sources": {}, "formats": {}, "extras": {}}

  def add_extras(name, extras):
    if extras:
      items[f"extras_{name}"], meta["extras"][f"extras_{name}"] = model_dir.extras_to_item(extras)

  if base_path:
    log(f"reading base model {base_path}")
    info = {}
    b = base.load_base_model(base_path, info=info, progress=progress, overrides=overrides)
    notes += info.get("notes", [])
    parts = {n: b[n] for n in ("unet", "text_encoder", "text_encoder_2") if n in b}
    if kohya_scaling is None:
      kohya_scaling = "text_encoder_2" in parts
    for path, alpha in loras:
      log(f"merging kohya LoRA {path} (multiplier {alpha}, {'kohya alpha/rank' if kohya_scaling else 'official'} scaling)")
      known = known_file(path, "kohya_lora")
      if known:
        log(f"  {known[1]}: {known[2]}")
      linfo = {}
      parts = lora_files.merge_kohya_lora_parts(parts, path, alpha, kohya_scaling, linfo)
      notes += linfo.get("notes", [])
      meta.setdefault("kohya_loras", []).append({"source": source_record(path), "alpha": alpha,
                                                 "scaling": "kohya" if kohya_scaling else "official"})
    items["unet"] = cast_tree(parts["unet"], dtype)
    meta["configs"]["unet"] = to_dict(b["unet_config"])
    if parts.get("text_encoder") is not None:
      items["text_encoder"] = cast_tree(parts["text_encoder"], dtype)
      meta["configs"]["text_encoder"] = to_dict(b["text_config"])
    if "text_encoder_2" in parts:  # SDXL
      items["text_encoder_2"] = cast_tree(parts["text_encoder_2"], dtype)
      meta["configs"]["text_encoder_2"] = to_dict(b["text_config_2"])
    if "vae" in b:
      items["vae"] = cast_tree(b["vae"], dtype)
      meta["configs"]["vae"] = to_dict(b["vae_config"])
    meta["sources"]["base"] = source_record(base_path)
    meta["formats"]["base"] = b["format"]
    meta["family"] = b["family"]
    log(f"base model: {'SDXL' if b['family'] == 'sdxl' else 'SD1.5'} ({b['format']}), "
        f"parts {', '.join(p for p in ('unet', 'vae', 'text_encoder', 'text_encoder_2') if p in b)}")
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
    meta["configs"]["motion_module"] = to_dict(cfg)
    meta["versions"]["motion_module"] = version
    meta["formats"]["motion_module"] = info["format"]
    meta["motion_module_had_pe"] = bool(info["extras"])
    meta["sources"]["motion_module"] = source_record(motion_module)
    add_extras("motion_module", info["extras"])
    log(f"motion module: {version}, pe length {cfg.max_len}, mid block {cfg.mid_block}")
    known = known_file(motion_module, "motion_module_" + info["format"])
    if known:
      log(f"  {known[1]}: {known[2]}")

  for i, (path, alpha) in enumerate(motion_loras):
    log(f"reading MotionLoRA {path} (alpha {alpha})")
    tree = lora_files.load_motion_lora(path, alpha)
    if mm_tree is not None:
      lora_files.check_lora_targets(tree, mm_tree, path)
    name = f"motion_lora_{i}"
    items[name] = cast_tree(tree, dtype, skip_leaf=("scale",))
    meta.setdefault("motion_loras", []).append({"item": name, "alpha": alpha})
    meta["sources"][name] = source_record(path)

  if domain_adapter:
    path, scale = domain_adapter
    log(f"reading domain adapter {path} (scale {scale})")
    tree = lora_files.load_domain_adapter(path, scale)
    if "unet" in items:
      lora_files.check_lora_targets(tree, items["unet"], path)
    items["domain_adapter"] = cast_tree(tree, dtype, skip_leaf=("scale",))
    meta["domain_adapter"] = {"item": "domain_adapter", "scale": scale}
    meta["sources"]["domain_adapter"] = source_record(path)

  meta["notes"] = notes
  meta["tensor_dtypes"] = {n: _dtypes(t) for n, t in items.items()}
  log(f"writing {out} ({', '.join(sorted(items))})")
  model_dir.save(out, items, meta, overwrite=overwrite)
  return meta


WHAT = ("motion_module", "motion_lora", "domain_adapter", "ldm", "diffusers")
BASE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def to_torch(model_dir_path: str, what: str, out: str, fmt: str = "original", item: Optional[str] = None,
             log=print) -> None:
  """Export one part of an Orbax model dir: motion_module (original file or diffusers folder),
  motion_lora / domain_adapter (original processor-LoRA file), ldm (single-file UNet+VAE+CLIP, the
  SDXL layout for an SDXL model), diffusers (the base model as a diffusers folder: unet/ vae/
  text_encoder/ [text_encoder_2/] tokenizer/ [tokenizer_2/])."""
  meta = model_dir.read_metadata(model_dir_path)
  if what not in WHAT:
    raise ConversionError(f"unknown --what {what!r}; choose from {', '.join(WHAT)}")
  if fmt not in ("original", "diffusers"):
    raise ConversionError(f"unknown --format {fmt!r}; choose original or diffusers")
  if fmt == "diffusers" and what not in ("motion_module", "diffusers"):
    raise ConversionError(f"--format diffusers is only available for motion_module (not {what}); "
                          "--what diffusers writes the base model as a diffusers folder")
  if what == "motion_module":
    extras_keys = meta.get("extras", {}).get("extras_motion_module", [])
    names = ["motion_module"] + (["extras_motion_module"] if extras_keys else [])
    trees, _ = model_dir.load_items(model_dir_path, names)
    extras = model_dir.extras_from_item(trees["extras_motion_module"], extras_keys) if extras_keys else {}
    cfg = model_dir.config_of(meta, "motion_module", model_dir_path)
    motion.export_motion_module(trees["motion_module"], cfg, out, fmt, extras=extras,
                                with_pe=meta.get("motion_module_had_pe"))
  elif what in ("motion_lora", "domain_adapter"):
    name = item or ("motion_lora_0" if what == "motion_lora" else "domain_adapter")
    trees, _ = model_dir.load_items(model_dir_path, [name])
    lora_files.export_lora(trees[name], out)
  else:
    present = [n for n in BASE_PARTS if n in meta.get("items", [])]
    if "unet" not in present:
      raise ConversionError(f"{model_dir_path}: has no unet item to export as {what}")
    extras_keys = meta.get("extras", {}).get("extras_base", [])
    trees, _ = model_dir.load_items(model_dir_path, present + (["extras_base"] if extras_keys else []))
    extras = model_dir.extras_from_item(trees["extras_base"], extras_keys) if extras_keys else {}
    if what == "ldm":
      base.export_ldm(out, trees["unet"], trees.get("vae"), trees.get("text_encoder"), extras,
                      trees.get("text_encoder_2"))
    else:
      base.export_diffusers(out, {p: trees[p] for p in present},
                            {p: model_dir.config_of(meta, p, model_dir_path) for p in present}, extras)
  log(f"wrote {out}")


# What each training stage exports in the official PyTorch formats (train.py's `export_files`).
STAGE_FILES = {"motion_module": ("motion_module", None), "motion_lora": ("motion_lora", "motion_lora_0"),
               "domain_adapter": ("domain_adapter", "domain_adapter")}


def export_stage(model_dir_path: str, stage: str, out_dir: str, fmt: str = "safetensors",
                 log=lambda *_: None) -> list[str]:
  """The trained part of a stage's exported model dir -> `<out_dir>/<stage>.<fmt>` in the
  official layout (mm_sd_*.ckpt, v2_lora_*.ckpt, v3_sd15_adapter.ckpt); nothing for the image
  and vae stages. fmt: "safetensors" or "ckpt"."""
  if stage not in STAGE_FILES:
    return []
  what, item = STAGE_FILES[stage]
  out = os.path.join(out_dir, f"{stage}.{fmt}")
  to_torch(model_dir_path, what, out, "original", item=item, log=log)
  return [out]
