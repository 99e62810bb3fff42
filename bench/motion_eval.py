"""Does the motion module animate coherently, and do the MotionLoRAs steer it? Measured on frames.

  python bench/motion_eval.py                        # the built-in tiny model and its MotionLoRAs
  python bench/motion_eval.py --ckpt DIR --motion-lora left=LORA_DIR ... --seeds 3

Samples "a {color} {shape}" for every colour x shape (x seeds) and tracks the object in each
frame colour-blind (`synthetic.clip_coherence`: the saturated pixels; every palette colour is
saturated, every background grey):
- coherence: one object of stable size in >= 14 of 16 frames, a mostly monotone path with a
  clear displacement and no jumps; with the motion module vs the frozen image model alone
  (frames denoised independently);
- direction: with each MotionLoRA at --alpha, the share of clips moving the LoRA's way; without
  one, the distribution of directions;
- colour: the share of clips whose object has the prompted colour (`synthetic.object_color`) in
  at least half the frames.
Appends one row per model variant, with the command, to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from adiff_jax import builtin, model_dir
from adiff_jax.free_init import FreeInitConfig
from adiff_jax.data.synthetic import COLORS, DIRECTIONS, SHAPES, clip_coherence, object_color
from adiff_jax.motion_module import image_model_alone
from adiff_jax.sampling import Pipeline, SamplingConfig
from bench.results import add_row, command

SECTION = "Motion evaluation (bench/motion_eval.py)"
HEADER = """Each clip is tracked colour-blind (`synthetic.clip_coherence`). Coherent: one object of
stable size in >= 14 of 16 frames, mostly monotone path, clear displacement, no jumps. Direction:
share of clips moving the MotionLoRA's way (without a LoRA: the distribution). Colour: the
object has the prompted colour in at least half the frames.

| date | model | clips | coherent | direction | prompted colour | command |
|---|---|---|---|---|---|---|"""


def sample_clips(pipe: Pipeline, cases, sc: SamplingConfig, batch: int, template: str) -> list[np.ndarray]:
  """uint8 videos (F, H, W, 3), one per (color, shape, seed) case."""
  videos = []
  for i in range(0, len(cases), batch):
    chunk = cases[i:i + batch]
    prompts = [template.format(color=c, shape=s) for c, s, _ in chunk]
    frames = pipe(prompts, [""] * len(chunk), [seed for *_, seed in chunk], sc, progress=False)
    videos += [np.rint(np.asarray(v) * 255).astype(np.uint8) for v in frames]
  return videos


def score(videos, cases) -> dict:
  tracks = [clip_coherence(v) for v in videos]
  coherent = [t for t in tracks if t["coherent"]]
  colored = [sum(object_color(f) == c for f in v) >= len(v) / 2 for v, (c, _, _) in zip(videos, cases)]
  return {"n": len(videos), "coherent": len(coherent) / len(videos),
          # Directions of coherent clips only: an incoherent clip has no direction to speak of.
          "directions": collections.Counter(t["direction"] for t in coherent),
          "color": float(np.mean(colored)),
          "reasons": collections.Counter(t["reason"].split(" (")[0] for t in tracks if not t["coherent"])}


LOSS_T = (900, 600, 300)


def loss_gap(cfg, params, n: int = 24, frames: int = 16, size: int = 64) -> list[float]:
  """Denoising MSE of the video model relative to the image model alone (frames independent) on
  `n` rendered clips with their captions, same latents, noise and t, per t in LOSS_T: < 0 where
  the motion module predicts the noise better from the other frames. A training-health check
  that needs no sampling."""
  import jax
  import jax.numpy as jnp
  from adiff_jax.data.synthetic import caption_for, render_clip, sample_params
  from adiff_jax.schedulers import add_noise
  from adiff_jax.vae import encode_video
  rng = np.random.default_rng(0)
  clips = [sample_params(rng, frames=frames, size=size, background=40) for _ in range(n)]
  video = jnp.asarray(np.stack([render_clip(p, frames=frames, size=size) for p in clips]),
                      jnp.float32) / 127.5 - 1                                   # (n, F, S, S, 3)
  video_pipe = Pipeline(cfg, params)
  image_pipe = Pipeline(*image_model_alone(cfg, params))
  z = encode_video(video_pipe.vae, {"params": params["vae"]}, video)
  ctx = video_pipe.encode_prompts([caption_for(p.color, p.shape, p.direction) for p in clips])
  applies = [(jax.jit(pp.unet.apply), {"params": pp.params["unet"]}) for pp in (video_pipe, image_pipe)]
  out = []
  for t in LOSS_T:
    tt = jnp.full((n,), t)
    noise = jax.random.normal(jax.random.key(t), z.shape)
    xt = add_noise(SamplingConfig().schedule, z, noise, tt)
    mse = [float(jnp.mean((apply(variables, xt, tt, ctx) - noise) ** 2)) for apply, variables in applies]
    out.append(mse[0] / mse[1] - 1)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", default=None, help="model dir (default: the built-in tiny model)")
  ap.add_argument("--motion-lora", action="append", default=None, metavar="DIRECTION=SPEC",
                  help="the direction a MotionLoRA (model dir, or builtin:left etc.) should give "
                       "(default: the built-in model's four; `none`: no MotionLoRA rows)")
  ap.add_argument("--alpha", type=float, default=1.0, help="MotionLoRA strength")
  ap.add_argument("--seeds", type=int, default=3, help="seeds per (colour, shape)")
  ap.add_argument("--colors", default=",".join(COLORS), help="comma-separated subset")
  ap.add_argument("--template", default="a {color} {shape}", help="prompt template")
  ap.add_argument("--steps", type=int, default=25)
  ap.add_argument("--frames", type=int, default=16)
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--guidance-scale", type=float, default=7.5)
  ap.add_argument("--batch", type=int, default=9)
  ap.add_argument("--no-baseline", action="store_true", help="skip the image-model-alone row")
  ap.add_argument("--loss", action="store_true",
                  help="only the denoising-loss check: the video model's MSE relative to the image "
                       f"model alone on rendered clips at t = {LOSS_T} (no sampling, no row)")
  ap.add_argument("--free-init", type=int, default=0, metavar="N",
                  help="sample with N FreeInit iterations (adiff_jax/free_init.py; 0: off)")
  ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  args = ap.parse_args()

  def load(motion_loras=()):
    if args.ckpt is None:
      return builtin.load(None, motion_loras)
    return model_dir.load(args.ckpt, motion_loras=motion_loras)

  cfg, params, _, _ = load()
  name = args.ckpt or "builtin"
  if args.motion_lora == ["none"]:
    loras = {}
  elif args.motion_lora is not None:
    loras = dict(s.split("=", 1) for s in args.motion_lora)
  else:
    loras = {d: f"builtin:{d}" for d in builtin.MOTION_LORAS} if args.ckpt is None else {}
  if cfg.motion is None:
    sys.exit(f"{name} has no motion module to evaluate")
  if args.loss:
    gaps = loss_gap(cfg, params, size=args.size, frames=args.frames)
    print(f"{name}: denoising MSE with the motion module vs the image model alone: " +
          ", ".join(f"t={t} {g:+.1%}" for t, g in zip(LOSS_T, gaps)))
    return

  sc = SamplingConfig(frames=args.frames, height=args.size, width=args.size, steps=args.steps,
                      guidance_scale=args.guidance_scale,
                      free_init=FreeInitConfig(iterations=args.free_init) if args.free_init else None)
  cases = [(c, s, 1000 * k + i) for i, (c, s) in enumerate(itertools.product(args.colors.split(","), SHAPES))
           for k in range(args.seeds)]
  print(f"model: {name}\n{len(cases)} clips per variant: colours x {len(SHAPES)} shapes x {args.seeds} seeds")
  variants = [("motion module", cfg, params, None, None)]
  if not args.no_baseline:
    variants.append(("image model alone", *image_model_alone(cfg, params), None, None))
  for d, spec in loras.items():
    _, _, lora, _ = load([(spec, args.alpha)])
    variants.append((f"MotionLoRA {d} (alpha {args.alpha:g})", cfg, params, lora, d))

  t0 = time.perf_counter()
  for label, c, p, lora, want in variants:
    r = score(sample_clips(Pipeline(c, p, lora=lora), cases, sc, args.batch, args.template), cases)
    dist = ", ".join(f"{d} {r['directions'].get(d, 0) / r['n']:.0%}" for d in DIRECTIONS)
    direction = (f"{r['directions'].get(want, 0) / r['n']:.0%} {want}" if want else dist)
    print(f"{label + ':':34s} coherent {r['coherent']:.0%}; direction {direction}; prompted colour "
          f"{r['color']:.0%}; failures {dict(r['reasons'])}")
    row = (f"| {time.strftime('%Y-%m-%d')} | {name}: {label} | {r['n']} x {args.frames}f, {args.steps} steps, "
           f"cfg {args.guidance_scale:g}{f', FreeInit x{args.free_init}' if args.free_init else ''} | {r['coherent']:.0%} | {direction} | {r['color']:.0%} | "
           f"`{command(__file__)}` |")
    add_row(args.results, SECTION, HEADER, row)
  print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
