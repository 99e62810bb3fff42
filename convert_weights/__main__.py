"""`python -m convert_weights`: inspect checkpoints, convert PyTorch files <-> Orbax model dirs."""
from __future__ import annotations

import argparse
import os
import sys

EPILOG = """examples:
  python -m convert_weights inspect mm_sd_v15_v2.ckpt
  python -m convert_weights to-orbax --base realisticVision.safetensors \\
      --motion-module v3_sd15_mm.ckpt --domain-adapter v3_sd15_adapter.ckpt:1.0 \\
      --motion-lora v2_lora_ZoomIn.ckpt:0.8 --lora detail.safetensors:0.6 --dtype fp16 --out models/rv_v3
  python -m convert_weights to-orbax --motion-module mm_sd_v15_v2.ckpt --out models/mm_v2
  python -m convert_weights to-torch models/mm_v2 --what motion_module --format diffusers --out mm_v2_diffusers
  python -m convert_weights to-torch models/rv_v3 --what ldm --out rv.safetensors
  python -m convert_weights to-orbax --base sd_xl_base_1.0.safetensors --motion-module mm_sdxl_v10_beta.ckpt \
      --dtype fp16 --out models/sdxl
  python -m convert_weights to-torch models/sdxl --what diffusers --out sdxl_diffusers
"""


def _path_value(spec: str, default: float) -> tuple[str, float]:
  """'file.ckpt:0.8' -> ('file.ckpt', 0.8); 'file.ckpt' -> ('file.ckpt', default)."""
  head, sep, tail = spec.rpartition(":")
  if sep and head:
    try:
      return head, float(tail)
    except ValueError:
      pass
  return spec, default


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m convert_weights", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Convert SD1.5 / SDXL / AnimateDiff PyTorch checkpoints to Orbax model "
                                          "directories and back (see docs/converters.md).")
  sub = p.add_subparsers(dest="cmd", required=True)

  i = sub.add_parser("inspect", help="detect the format of a checkpoint file or folder and summarise it")
  i.add_argument("path", metavar="FILE_OR_DIR")
  i.add_argument("--no-check", action="store_true", help="do not run the conversion check")

  o = sub.add_parser("to-orbax", help="convert PyTorch checkpoints into one Orbax model directory",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  o.add_argument("--base", help="SD1.5 or SDXL base model: LDM single file (.safetensors/.ckpt) or diffusers folder")
  o.add_argument("--motion-module", help="motion module: original file, diffusers MotionAdapter folder/file, "
                                         "or a train.py UNet checkpoint")
  o.add_argument("--motion-lora", action="append", default=[], metavar="PATH[:ALPHA]",
                 help="MotionLoRA (repeatable); ALPHA default 1.0; kept unmerged with its scale")
  o.add_argument("--domain-adapter", metavar="PATH[:SCALE]", help="v3 domain adapter; SCALE default 1.0")
  o.add_argument("--lora", action="append", default=[], metavar="PATH[:ALPHA]",
                 help="kohya/A1111 LoRA merged into UNet and text encoder (repeatable); ALPHA default 0.8")
  o.add_argument("--kohya-scaling", action="store_true", default=None,
                 help="scale kohya LoRAs by their per-layer alpha/rank (default: for SDXL only; SD1.5 "
                      "takes the official AnimateDiff merge W += ALPHA * up @ down, ignoring .alpha)")
  o.add_argument("--dtype", choices=["fp32", "fp16", "bf16", "keep"], default="keep",
                 help="storage dtype of the converted parameters (default: keep the file's)")
  o.add_argument("--mm-version", choices=["v1", "v2", "v3"],
                 help="motion-module version when the file cannot tell (no pe buffers)")
  o.add_argument("--mm-heads", type=int, help="motion-module attention heads (default 8 or from the file's config)")
  o.add_argument("--mm-norm-groups", type=int, help="motion-module GroupNorm groups (default 32)")
  o.add_argument("--unet-heads", type=int, help="spatial attention heads of the UNet (default 8, SD1.5)")
  o.add_argument("--norm-groups", type=int, help="GroupNorm groups of UNet and VAE (default 32)")
  o.add_argument("--text-heads", type=int, help="CLIP attention heads (default hidden/64)")
  o.add_argument("--text2-heads", type=int, help="SDXL second text encoder's attention heads (default hidden/64)")
  o.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
  o.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

  t = sub.add_parser("to-torch", help="export part of an Orbax model directory to PyTorch formats")
  t.add_argument("model_dir", metavar="ORBAX_DIR")
  t.add_argument("--what", required=True, choices=["motion_module", "motion_lora", "domain_adapter", "ldm", "diffusers"],
                 help="ldm: the base model as one single file (SD1.5 or SDXL layout); diffusers: the base "
                      "model as a diffusers folder")
  t.add_argument("--format", default="original", choices=["original", "diffusers"],
                 help="original: .ckpt/.safetensors by --out extension; diffusers: a MotionAdapter folder "
                      "(motion_module only)")
  t.add_argument("--item", help="which item, e.g. motion_lora_1 (default motion_lora_0 / domain_adapter)")
  t.add_argument("--out", required=True, help="output file (.safetensors/.ckpt) or folder (diffusers)")
  return p


def _overrides(a) -> dict:
  ov: dict = {}
  if a.unet_heads:
    ov.setdefault("unet", {})["attention_heads"] = a.unet_heads
  if a.norm_groups:
    ov.setdefault("unet", {})["norm_num_groups"] = a.norm_groups
    ov.setdefault("vae", {})["norm_num_groups"] = a.norm_groups
  if a.text_heads:
    ov.setdefault("text_encoder", {})["num_heads"] = a.text_heads
  if a.text2_heads:
    ov.setdefault("text_encoder_2", {})["num_heads"] = a.text2_heads
  if a.mm_heads:
    ov.setdefault("motion_module", {})["num_heads"] = a.mm_heads
  if a.mm_norm_groups:
    ov.setdefault("motion_module", {})["norm_groups"] = a.mm_norm_groups
  return ov


def main(argv=None) -> int:
  a = _parser().parse_args(argv)
  log = lambda s: print(s, file=sys.stderr)
  if a.cmd == "inspect":
    from convert_weights.inspect_cmd import inspect
    print(inspect(a.path, check=not a.no_check))
  elif a.cmd == "to-orbax":
    from convert_weights.convert import to_orbax
    meta = to_orbax(a.out, a.base, a.motion_module, [_path_value(s, 1.0) for s in a.motion_lora],
                    _path_value(a.domain_adapter, 1.0) if a.domain_adapter else None,
                    [_path_value(s, 0.8) for s in a.lora], a.dtype, a.kohya_scaling, a.mm_version,
                    _overrides(a), a.overwrite, log=log)
    for n in meta.get("notes", []):
      log(f"note: {n}")
    print(os.path.abspath(a.out))
  else:
    from convert_weights.convert import to_torch
    to_torch(a.model_dir, a.what, a.out, a.format, a.item, log=log)
  return 0


if __name__ == "__main__":
  # Conversion errors (unreadable, unrecognised or mismatched files) print one `error:` line
  # and exit 2; anything else is a bug and keeps its traceback.
  from adiff_jax.errors import run_cli
  sys.exit(run_cli(main))
