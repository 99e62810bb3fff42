"""Packs a trained tiny model as the built-in one (adiff_jax/assets/tiny_model): fp16 weights
plus TRAINING.md, which records the command, configs, commit and per-stage figures of the run.

  python tools/ship_tiny_model.py --runs runs      # after tools/train_tiny_chain.py --no-ship

Reads the chain's run dirs (tools/train_tiny_chain.STAGES, each with metrics.jsonl) and ships
<runs>/<MOTION_STAGE>/export/model (base + motion module) with the four
MotionLoRAs under motion_loras/<direction>. The output directory is replaced atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from adiff_jax import model_dir  # noqa: E402
from adiff_jax.builtin import MOTION_LORAS, TRAINED_DIR  # noqa: E402
from adiff_jax.params import cast_tree  # noqa: E402
from tools.train_tiny_chain import MOTION_STAGE, STAGES  # noqa: E402

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


def earlier_rows(path: str) -> dict:
  """The stage rows of an earlier TRAINING.md, {stage: table line}, each ending in the commit its
  stage ran at (a row of the older six-column table gets the file's "at commit X")."""
  if not os.path.isfile(path):
    return {}
  text = open(path).read()
  m = re.search(r"at commit (\w+)", text)
  commit = m.group(1) if m else "?"
  rows = {}
  for line in text.splitlines():
    if line.startswith("| ") and not line.startswith("| stage"):
      cells = line.rstrip().rstrip("|").split("|")[1:]
      if len(cells) == 6:
        cells.append(f" {commit} ")
      rows[cells[0].strip()] = "|" + "|".join(cells) + "|"
  return rows


def training_md(runs: str, commit: str, earlier: str = "") -> str:
  """TRAINING.md: one row per stage of STAGES from its run dir under `runs`; a stage whose run dir
  is absent (the chain resumed from a shipped model) keeps its row from the `earlier` TRAINING.md,
  marked as such."""
  old = earlier_rows(earlier) if earlier else {}
  rows, reused, total = [], [], 0.0
  for name, cfg, _, what in STAGES:
    run = os.path.join(runs, name)
    if not os.path.isfile(os.path.join(run, "metrics.jsonl")) and name in old:
      reused.append(name)
      rows.append(old[name].rstrip())
      total += float(old[name].split("|")[5])
      continue
    s = stage_summary(run)
    total += s["minutes"]
    rows.append(f"| {name} | `{cfg}` | {what} | {s['steps']} | {s['minutes']:.1f} | {s['loss']:.4f} | {commit} |")
  intro = ("Trained from scratch by `train.py` on the built-in synthetic moving-shapes dataset on "
           f"2 CPU cores by `python tools/train_tiny_chain.py` at commit {commit}, then packed by "
           "`tools/ship_tiny_model.py` (weights cast to fp16; LoRA scales kept in f32).")
  if reused:
    intro += (f" Stages {', '.join(reused)} are earlier runs' (their rows, with the commit each ran "
              "at, are copied from the previous TRAINING.md): this run started from the model they "
              "shipped, its fp16 weights read back as f32.")
  lines = ["# The built-in tiny model", "", intro, "",
           "| stage | config | what it trains | steps | minutes | final loss | commit |",
           "|---|---|---|---|---|---|---|",
           *rows,
           "", f"Total: {total:.0f} minutes of wall-clock time (compilation included; the machine also "
           "ran other work, tests and evaluations, during the chain, so a quiet machine is faster). "
           "Figures: `python bench/motion_eval.py` (bench/RESULTS.md).", ""]
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--runs", default="runs", help="folder holding the chain's run dirs")
  ap.add_argument("--out", default=TRAINED_DIR)
  ap.add_argument("--commit", help="commit that trained the model (default: HEAD)")
  ap.add_argument("--earlier", default=os.path.join(TRAINED_DIR, "TRAINING.md"),
                  help="TRAINING.md of the model this run started from: rows for stages with no "
                       "run dir under --runs (default: the shipped model's)")
  args = ap.parse_args()

  src = os.path.join(args.runs, MOTION_STAGE, "export", "model")
  items, meta = model_dir.load_items(src)
  items = {k: cast_tree(v, "fp16") for k, v in items.items()}
  meta = dict(meta, dtype="fp16")
  meta.pop("items", None)
  meta.setdefault("training", {})["base"] = "tiny_image (see TRAINING.md)"
  commit = args.commit or subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip() or "unknown"

  out = os.path.abspath(args.out)
  tmp = out + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  model_dir.save(tmp, items, meta)
  for d in MOTION_LORAS:
    lora_src = os.path.join(args.runs, f"tiny_lora_{d}", "export", "model")
    trees, lmeta = model_dir.load_items(lora_src, ["motion_lora_0"])
    model_dir.save(os.path.join(tmp, "motion_loras", d),
                   {"motion_lora_0": cast_tree(trees["motion_lora_0"], "fp16", skip_leaf=("scale",))},
                   {"dtype": "fp16", "motion_loras": lmeta.get("motion_loras", []),
                    "versions": {"motion_lora": f"built-in MotionLoRA {d}"},
                    "training": lmeta.get("training", {})})
  with open(os.path.join(tmp, "TRAINING.md"), "w") as f:
    f.write(training_md(args.runs, commit, args.earlier))
  shutil.rmtree(out, ignore_errors=True)
  os.replace(tmp, out)
  print(f"shipped {src} (+ MotionLoRAs {', '.join(MOTION_LORAS)}) -> {out}")


if __name__ == "__main__":
  main()
