"""Packs a trained tiny model as the built-in one (adiff_jax/assets/tiny_model): fp16 weights
plus TRAINING.md, which records the commands, configs and per-stage figures of the run.

  python tools/ship_tiny_model.py --runs runs            # after the three README commands

Reads <runs>/tiny_vae, <runs>/tiny_image and <runs>/tiny (each with metrics.jsonl), ships
<runs>/tiny/export/model. The output directory is replaced atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from adiff_jax.builtin import TRAINED_DIR  # noqa: E402
from convert_weights import orbax_io  # noqa: E402
from convert_weights.pipeline import cast_tree  # noqa: E402

STAGES = [("tiny_vae", "configs/training/tiny_vae.yaml", "the tiny VAE as an autoencoder"),
          ("tiny_image", "configs/training/tiny_image.yaml",
           "the image model (\"personalised T2I\"): UNet + text encoder on single frames"),
          ("tiny", "configs/training/tiny.yaml", "the motion module on 16-frame clips, base frozen")]


def stage_summary(run_dir: str) -> dict:
  """Steps, minutes (first step's start, compile included, to the last log line: validation and
  export included) and the mean of the last 4 logged losses of a run."""
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  steps = [r for r in rows if "loss" in r]
  if not steps:
    raise SystemExit(f"{run_dir}: no training steps logged")
  start = steps[0]["time"] - steps[0].get("step_s", 0.0)
  return {"steps": steps[-1]["step"], "minutes": (rows[-1]["time"] - start) / 60,
          "loss": sum(r["loss"] for r in steps[-4:]) / len(steps[-4:])}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--runs", default="runs", help="folder holding tiny_vae/, tiny_image/, tiny/")
  ap.add_argument("--out", default=TRAINED_DIR)
  args = ap.parse_args()

  src = os.path.join(args.runs, "tiny", "export", "model")
  items, meta = orbax_io.load_model_dir(src)
  items = {k: cast_tree(v, "fp16") for k, v in items.items()}
  meta = dict(meta, dtype="fp16")
  meta.pop("items", None)
  meta.setdefault("training", {})["base"] = "tiny_image (see TRAINING.md)"

  commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
  lines = ["# The built-in tiny model", "",
           "Trained from scratch by `train.py` on the built-in synthetic moving-shapes dataset "
           f"on 2 CPU cores, then packed by `tools/ship_tiny_model.py` at commit {commit} "
           "(weights cast to fp16).", "", "```bash"]
  lines += [f"python train.py --config {cfg}" for _, cfg, _ in STAGES[:2]]
  lines.append(f"python train.py --config {STAGES[2][1]} model=runs/tiny_image/export/model")
  lines += ["python tools/ship_tiny_model.py", "python bench/motion_eval.py   # figures in bench/RESULTS.md",
            "```", "", "| stage | config | what it trains | steps | minutes | final loss |", "|---|---|---|---|---|---|"]
  for name, cfg, what in STAGES:
    s = stage_summary(os.path.join(args.runs, name))
    lines.append(f"| {name} | `{cfg}` | {what} | {s['steps']} | {s['minutes']:.1f} | {s['loss']:.4f} |")
  lines.append("")

  out = os.path.abspath(args.out)
  tmp = out + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  orbax_io.save_model_dir(tmp, items, meta)
  with open(os.path.join(tmp, "TRAINING.md"), "w") as f:
    f.write("\n".join(lines))
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  print(f"shipped {src} -> {out}")


if __name__ == "__main__":
  main()
