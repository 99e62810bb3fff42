"""Does a trained image model encode the direction words? Check before a motion-module run.

  python bench/direction_probe.py --ckpt runs/tiny_image/export/model

AnimateDiff's motion module has no text input: "moving left" can steer it only through what the
frozen image model does with those words. Three measurements on the image model alone (no motion
modules, cheap: single frames):

1. Text encoder: how much swapping one word changes the CLIP hidden states (relative L2 change,
   at the word's own token and averaged over the end/padding tokens that follow), for colour,
   shape and direction words. A word that barely moves the hidden states cannot steer anything.
2. Denoising loss: on real frames with trails, how much larger the UNet's noise-prediction error
   gets when the caption's colour or direction word is wrong (same frames, noise and t). ~0%
   means the model has not learned to use the word at all.
3. Images: with `data.synthetic_trail` the training frames show their direction (a fading trail
   behind the object); `trail_direction` reads it back from single-frame samples of
   "a {color} {shape} moving {direction}". Chance is 25%.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from adiff_jax.data.synthetic import (COLORS, DIRECTIONS, SHAPES, caption_for, render_clip,
                                      sample_params, trail_direction)
from adiff_jax.sampling import Pipeline, SamplingConfig
from adiff_jax.schedulers import add_noise
from adiff_jax.vae import encode_video
from adiff_jax.motion_module import image_model_alone


_LOSS_T = (900, 600, 300)                                           # high, mid, low noise


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


def word_loss(pipe: Pipeline, size: int, n: int = 64) -> dict:
  """{kind: [relative increase of the denoising MSE with that word wrong, per t in _LOSS_T]}."""
  rng = np.random.default_rng(0)
  opposite = dict(zip(DIRECTIONS, ("right", "left", "down", "up")))
  colours = list(COLORS)
  frames, caps = [], {"right": [], "colour": [], "direction": []}
  for _ in range(n):
    p = sample_params(rng, frames=16, size=size, background=40, trail=True)
    frames.append(render_clip(p, frames=16, size=size)[8])                  # mid-clip frame
    caps["right"].append(caption_for(p.color, p.shape, p.direction))
    wrong = colours[(colours.index(p.color) + 1) % len(colours)]
    caps["colour"].append(caption_for(wrong, p.shape, p.direction))
    caps["direction"].append(caption_for(p.color, p.shape, opposite[p.direction]))
  video = jnp.asarray(np.stack(frames)[:, None], jnp.float32) / 127.5 - 1   # (n, 1, S, S, 3)
  z = encode_video(pipe.vae, {"params": pipe.params["vae"]}, video)
  ctx = {k: pipe.encode_prompts(v) for k, v in caps.items()}
  apply = jax.jit(lambda x, t, c: pipe.unet.apply({"params": pipe.params["unet"]}, x, t, c))
  out = {"colour": [], "direction": []}
  for t in _LOSS_T:
    tt = jnp.full((n,), t)
    noise = jax.random.normal(jax.random.key(t), z.shape)
    xt = add_noise(SamplingConfig().schedule, z, noise, tt)
    mse = {k: float(jnp.mean((apply(xt, tt, c) - noise) ** 2)) for k, c in ctx.items()}
    for kind in out:
      out[kind].append(mse[kind] / mse["right"] - 1)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", required=True, help="Orbax model dir (an image-stage export)")
  ap.add_argument("--colors", default="red,blue,yellow,green")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--guidance-scale", type=float, default=7.5)
  ap.add_argument("--size", type=int, default=64)
  args = ap.parse_args()

  from adiff_jax import model_dir
  cfg, params, _, _ = model_dir.load(args.ckpt)
  desc = args.ckpt
  pipe = Pipeline(*image_model_alone(cfg, params))
  print(f"model: {desc}")
  for kind, (own, after) in word_sensitivity(pipe).items():
    print(f"text encoder, {kind:9s} word swapped: {own:.1%} change at its token, "
          f"{after:.1%} over the tokens after it")
  for kind, rise in word_loss(pipe, args.size).items():
    print(f"denoising loss with a wrong {kind:9s} word: "
          + ", ".join(f"{r:+.1%} at t={t}" for r, t in zip(rise, _LOSS_T)))

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
