"""Trains the built-in tiny model end to end and packs it (issue 14's chain, one command):

  python tools/train_tiny_chain.py                 # ~4 h on 2 CPU cores
  python tools/train_tiny_chain.py --no-ship       # train only (pack later: tools/ship_tiny_model.py)

Stages, each `python train.py --config ...` in its own process, each reading the previous
stage's exported model dir:
  tiny_vae         the VAE as an autoencoder                      configs/training/tiny_vae.yaml
  tiny_image       the image model (UNet + text encoder, frames)  configs/training/tiny_image.yaml
  tiny             the motion module on 16-frame clips            configs/training/tiny.yaml
  tiny_more        the same motion module, 3x the batch           configs/training/tiny_motion_more.yaml
  tiny_long        the same again, batch 8, 900 steps, annealed   configs/training/tiny_motion_long.yaml
  tiny_longer      1000 more steps at batch 8, cosine restarted   configs/training/tiny_motion_longer.yaml
  tiny_lora_DIR    one MotionLoRA per direction (left, right, up, down), on clips that move that
                   way only                                       configs/training/tiny_motion_lora.yaml
then `tools/ship_tiny_model.py` packs base + motion module + MotionLoRAs into
adiff_jax/assets/tiny_model. A stage whose export exists is skipped, and train.py resumes an
interrupted stage from its checkpoint, so running the command again continues where it stopped.
`--from-shipped STAGE` continues from the shipped model instead of retraining what it holds.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from adiff_jax.builtin import MOTION_LORAS as DIRECTIONS, TRAINED_DIR  # noqa: E402


# (run name, config, the run whose export it starts from, what it trains): the one stage table,
# also read by tools/ship_tiny_model.py. MOTION_STAGE is the run whose model ships.
STAGES = [("tiny_vae", "configs/training/tiny_vae.yaml", None, "the tiny VAE as an autoencoder"),
          ("tiny_image", "configs/training/tiny_image.yaml", "tiny_vae",
           "the image model (\"personalised T2I\"): UNet + text encoder on single frames"),
          ("tiny", "configs/training/tiny.yaml", "tiny_image", "the motion module on 16-frame clips, base frozen"),
          ("tiny_more", "configs/training/tiny_motion_more.yaml", "tiny", "the same motion module, 3x the batch"),
          ("tiny_long", "configs/training/tiny_motion_long.yaml", "tiny_more",
           "the same motion module, batch 8, 900 steps, learning rate annealed to 0"),
          ("tiny_longer", "configs/training/tiny_motion_longer.yaml", "tiny_long",
           "the same motion module, 1000 more steps at batch 8 (cosine restarted at 1.5e-3)")]
MOTION_STAGE = "tiny_longer"
STAGES += [(f"tiny_lora_{d}", "configs/training/tiny_motion_lora.yaml", MOTION_STAGE,
            f"MotionLoRA `{d}`: clips moving {d} only, base and motion module frozen") for d in DIRECTIONS]


def stages(runs: str, from_shipped: Optional[str] = None) -> list[tuple[str, str, list[str]]]:
  """(run name, config, overrides) in training order. from_shipped: start at that stage, from
  the shipped built-in model instead of its parent's export (the stages before it are skipped)."""
  names = [name for name, *_ in STAGES]
  if from_shipped is not None and from_shipped not in names:
    raise SystemExit(f"--from-shipped: no stage {from_shipped!r}; stages: {', '.join(names)}")
  first = 0 if from_shipped is None else names.index(from_shipped)
  out = []
  for name, cfg, parent, _ in STAGES[first:]:
    if name == from_shipped:
      ov = [f"model={TRAINED_DIR}"]
    else:
      ov = [] if parent is None else [f"model={os.path.join(runs, parent, 'export', 'model')}"]
    if name.startswith("tiny_lora_"):
      ov.append(f"data.synthetic_directions=[{name[len('tiny_lora_'):]}]")
    out.append((name, cfg, ov + [f"output_dir={os.path.join(runs, name)}"]))
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--runs", default="runs", help="folder for the stages' run dirs (default runs/)")
  ap.add_argument("--no-ship", action="store_true", help="train only; do not pack the model")
  ap.add_argument("--from-shipped", metavar="STAGE",
                  help="start at STAGE from the shipped built-in model (its earlier stages are kept: "
                       "their TRAINING.md rows carry over), e.g. --from-shipped tiny_longer")
  args = ap.parse_args(argv)
  runs = os.path.abspath(args.runs)
  t_all = time.time()
  for name, cfg, overrides in stages(runs, args.from_shipped):
    if os.path.isfile(os.path.join(runs, name, "export", "model", "metadata.json")):
      print(f"[chain] {name}: already exported, skipped", flush=True)
      continue
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, cfg)] + overrides
    print(f"[chain] {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc:
      print(f"[chain] {name} failed (exit {rc}); run the command again to resume", flush=True)
      return rc
    print(f"[chain] {name}: done in {(time.time() - t0) / 60:.1f} min", flush=True)
  print(f"[chain] all stages done in {(time.time() - t_all) / 60:.1f} min", flush=True)
  if args.no_ship:
    return 0
  return subprocess.call([sys.executable, os.path.join(ROOT, "tools", "ship_tiny_model.py"),
                          "--runs", runs], cwd=ROOT)


if __name__ == "__main__":
  sys.exit(main())
