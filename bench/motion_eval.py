"""Does the motion module move things as prompted? Direction accuracy on the synthetic vocabulary.

  python bench/motion_eval.py                       # the built-in tiny model
  python bench/motion_eval.py --ckpt DIR --seeds 3

Samples "a {color} {shape} moving {direction}" for every colour x shape x direction (x seeds),
finds the object in each frame by its colour and fits its displacement; a sample counts as
correct when the dominant direction equals the prompt's. The baseline is the same model with the
motion modules removed (the frozen image model alone: frames are denoised independently).
Appends the figures and the command to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from adiff_jax.data.synthetic import COLORS, DIRECTIONS, SHAPES, caption_for, motion_direction
from adiff_jax.pipeline import Pipeline, SamplingConfig
from bench.results import add_row, command


def evaluate(pipe: Pipeline, cases, sc: SamplingConfig, batch: int) -> tuple[float, float, list]:
  """(accuracy, detection rate, per-case predictions)."""
  preds = []
  for i in range(0, len(cases), batch):
    chunk = cases[i:i + batch]
    prompts = [caption_for(c, s, d) for c, s, d, _ in chunk]
    frames = pipe(prompts, [""] * len(chunk), [seed for *_, seed in chunk], sc, progress=False)
    for (color, _, _, _), video in zip(chunk, frames):
      preds.append(motion_direction((video * 255).astype(np.uint8), color))
  correct = sum(p == d for p, (_, _, d, _) in zip(preds, cases))
  found = sum(p is not None for p in preds)
  return correct / len(cases), found / len(cases), preds


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", default=None, help="Orbax model dir (default: the built-in tiny model)")
  ap.add_argument("--seeds", type=int, default=1, help="seeds per (colour, shape, direction)")
  ap.add_argument("--colors", default=",".join(COLORS), help="comma-separated subset")
  ap.add_argument("--steps", type=int, default=25)
  ap.add_argument("--frames", type=int, default=16)
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--guidance-scale", type=float, default=7.5)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  args = ap.parse_args()

  import sample
  cfg, params, lora, desc = sample.load_model(sample.parse_args(["--ckpt", args.ckpt] if args.ckpt else []))
  sc = SamplingConfig(frames=args.frames, height=args.size, width=args.size, steps=args.steps,
                      guidance_scale=args.guidance_scale)
  colors = args.colors.split(",")
  cases = [(c, s, d, 1000 * k + i) for i, (c, s, d) in enumerate(itertools.product(colors, SHAPES, DIRECTIONS))
           for k in range(args.seeds)]
  print(f"model: {desc}\n{len(cases)} samples: {len(colors)} colours x {len(SHAPES)} shapes x "
        f"{len(DIRECTIONS)} directions x {args.seeds} seeds")

  t0 = time.perf_counter()
  acc, found, _ = evaluate(Pipeline(cfg, params, lora=lora), cases, sc, args.batch)
  print(f"with motion module:    direction accuracy {acc:.1%} (object found and moving in {found:.1%})")
  image_only = dataclasses.replace(cfg, motion=None)
  base_params = dict(params, unet=_strip_motion(params["unet"]))
  acc0, found0, _ = evaluate(Pipeline(image_only, base_params), cases, sc, args.batch)
  print(f"image model alone:     direction accuracy {acc0:.1%} (object found and moving in {found0:.1%})")
  print(f"chance: {1 / len(DIRECTIONS):.0%}; {time.perf_counter() - t0:.0f} s")

  cmd = command(__file__)
  row = (f"| {time.strftime('%Y-%m-%d')} | {args.ckpt or 'built-in tiny'} | {len(cases)} | "
         f"{acc:.1%} | {acc0:.1%} | {1 / len(DIRECTIONS):.0%} | `{cmd}` |")
  add_row(args.results, "Motion evaluation (bench/motion_eval.py)",
          "| date | model | samples | accuracy with motion module | image model alone | chance | command |\n"
          "|---|---|---|---|---|---|---|", row)


def _strip_motion(tree):
  """The UNet tree without its motion-module subtrees."""
  if not isinstance(tree, dict):
    return tree
  return {k: _strip_motion(v) for k, v in tree.items() if not k.startswith("motion_modules_")}


if __name__ == "__main__":
  main()
