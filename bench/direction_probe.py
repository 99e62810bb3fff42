"""Does a trained image model encode the direction words? Check before a motion-module run.

  python bench/direction_probe.py --ckpt runs/tiny_image/export/model

AnimateDiff's motion module has no text input: "moving left" can steer it only through what the
frozen image model does with those words. Two measurements on the image model alone (no motion
modules, cheap: single frames):

1. Text encoder: how much swapping one word changes the CLIP hidden states (relative L2 change,
   at the word's own token and averaged over the end/padding tokens that follow), for colour,
   shape and direction words. A word that barely moves the hidden states cannot steer anything.
2. Images: with `data.synthetic_trail` the training frames show their direction (a fading trail
   behind the object); `trail_direction` reads it back from single-frame samples of
   "a {color} {shape} moving {direction}". Chance is 25%.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from adiff_jax.data.synthetic import DIRECTIONS, SHAPES, caption_for, trail_direction
from adiff_jax.pipeline import Pipeline, SamplingConfig
from bench.motion_eval import image_model_alone


def word_sensitivity(pipe: Pipeline) -> dict[str, tuple[float, float]]:
  """{kind: (change at the swapped token, mean change over the following tokens)}."""
  base = ("red", "circle", "left")
  swaps = {"colour": ("blue", "circle", "left"), "shape": ("red", "square", "left"),
           "direction": ("red", "circle", "right")}
  caps = [caption_for(*base)] + [caption_for(*s) for s in swaps.values()]
  ids = np.asarray(pipe.tokenizer(caps))
  emb = np.asarray(pipe.encode_prompts(caps))                       # (4, L, D)
  scale = np.linalg.norm(emb[0], axis=-1).mean()
  out = {}
  for i, kind in enumerate(swaps, 1):
    pos = int(np.nonzero(ids[i] != ids[0])[0][0])                   # the swapped word's token
    diff = np.linalg.norm(emb[i] - emb[0], axis=-1) / scale
    out[kind] = (float(diff[pos]), float(diff[pos + 1:].mean()))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", required=True, help="Orbax model dir (an image-stage export)")
  ap.add_argument("--colors", default="red,blue,yellow,green")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--guidance-scale", type=float, default=7.5)
  ap.add_argument("--size", type=int, default=64)
  args = ap.parse_args()

  import sample
  cfg, params, _, desc = sample.load_model(sample.parse_args(["--ckpt", args.ckpt]))
  pipe = Pipeline(*image_model_alone(cfg, params))
  print(f"model: {desc}")
  for kind, (own, after) in word_sensitivity(pipe).items():
    print(f"text encoder, {kind:9s} word swapped: {own:.1%} change at its token, "
          f"{after:.1%} over the tokens after it")

  cases = list(itertools.product(args.colors.split(","), SHAPES, DIRECTIONS))
  prompts = [caption_for(*c) for c in cases]
  sc = SamplingConfig(frames=1, height=args.size, width=args.size, steps=args.steps,
                      guidance_scale=args.guidance_scale)
  frames = pipe(prompts, [""] * len(prompts), list(range(len(prompts))), sc, progress=False)
  got = [trail_direction(np.rint(np.asarray(f[0]) * 255).astype(np.uint8)) for f in frames]
  acc = np.mean([g == c[2] for g, c in zip(got, cases)])
  per = ", ".join(f"{d} {np.mean([g == d for g, c in zip(got, cases) if c[2] == d]):.0%}"
                  for d in DIRECTIONS)
  print(f"single images: trail points the prompted way in {acc:.1%} of {len(cases)} ({per}); "
        f"chance {1 / len(DIRECTIONS):.0%}")


if __name__ == "__main__":
  main()
