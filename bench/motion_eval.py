"""Does the motion module move things as prompted? Direction accuracy on the synthetic vocabulary.

  python bench/motion_eval.py                       # the built-in tiny model
  python bench/motion_eval.py --ckpt DIR --seeds 3

Samples "a {color} {shape} moving {direction}" for every colour x shape x direction (x seeds),
finds the object in each frame (the saturated pixels: every palette colour is saturated, every
background grey, so a wrong hue does not hide the motion) and fits its displacement; a sample
counts as correct when the dominant direction equals the prompt's (a static or missing object
counts as wrong). The baseline is the same model with the motion modules removed (the frozen
image model alone: frames are denoised independently). Also reported: how often the object has
the prompted colour (`object_color`: an object-sized saturated region whose hue is the prompt's,
so noise does not count). Appends the figures and the command to bench/RESULTS.md.
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

from adiff_jax.data.synthetic import (COLORS, DIRECTIONS, SHAPES, caption_for, motion_direction,
                                      object_color)
from adiff_jax.pipeline import Pipeline, SamplingConfig
from adiff_jax.train.state import split
from bench.results import add_row, command


def image_model_alone(cfg, params: dict):
  """(ModelConfig, params) of the frozen image model: the motion modules removed."""
  return (dataclasses.replace(cfg, motion=None),
          dict(params, unet=split(params["unet"], lambda p: "motion_modules_" in p)[1]))


def evaluate(pipe: Pipeline, cases, sc: SamplingConfig, batch: int) -> dict:
  """Direction accuracy, rate of moving objects found, rate of prompted colour, predictions."""
  preds, colored = [], []
  for i in range(0, len(cases), batch):
    chunk = cases[i:i + batch]
    prompts = [caption_for(c, s, d) for c, s, d, _ in chunk]
    frames = pipe(prompts, [""] * len(chunk), [seed for *_, seed in chunk], sc, progress=False)
    for (color, _, _, _), video in zip(chunk, frames):
      video = np.rint(np.asarray(video) * 255).astype(np.uint8)
      preds.append(motion_direction(video))
      # An object-sized region of the prompted colour in at least half the frames.
      colored.append(sum(object_color(f) == color for f in video) >= len(video) / 2)
  n = len(cases)
  return {"accuracy": sum(p == d for p, (_, _, d, _) in zip(preds, cases)) / n,
          "moving": sum(p is not None for p in preds) / n, "color": sum(colored) / n,
          "preds": preds}


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

  if cfg.motion is None:
    sys.exit(f"{desc} has no motion module to evaluate")
  t0 = time.perf_counter()
  results = {}
  for name, model, p, lo in [
      ("with motion module", cfg, params, lora),
      ("image model alone", *image_model_alone(cfg, params), None)]:
    r = results[name] = evaluate(Pipeline(model, p, lora=lo), cases, sc, args.batch)
    per_dir = ", ".join(f"{d} {np.mean([q == d for q, c in zip(r['preds'], cases) if c[2] == d]):.0%}"
                        for d in DIRECTIONS)
    print(f"{name + ':':20s} direction accuracy {r['accuracy']:.1%} ({per_dir}); moving object "
          f"found in {r['moving']:.1%}; prompted colour in {r['color']:.1%}")
  print(f"chance: {1 / len(DIRECTIONS):.0%}; {time.perf_counter() - t0:.0f} s")

  mm, base = results["with motion module"], results["image model alone"]
  row = (f"| {time.strftime('%Y-%m-%d')} | {args.ckpt or desc.split(' (')[0]} | {len(cases)} x "
         f"{args.frames}f, {args.steps} steps, cfg {args.guidance_scale} | {mm['accuracy']:.1%} | "
         f"{base['accuracy']:.1%} | {1 / len(DIRECTIONS):.0%} | {mm['color']:.0%} / {base['color']:.0%} | "
         f"`{command(__file__)}` |")
  add_row(args.results, "Motion evaluation (bench/motion_eval.py)",
          "| date | model | samples | direction accuracy, motion module | image model alone | chance | "
          "prompted colour (mm / alone) | command |\n|---|---|---|---|---|---|---|---|", row)


if __name__ == "__main__":
  main()
