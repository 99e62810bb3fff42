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


def _loss_batch(pipe: Pipeline, n: int, frames: int, size: int, directions=None, seed: int = 0):
  """(latents (n, F, h, w, 4), caption embeddings) of `n` rendered clips, encoded by `pipe`."""
  import jax.numpy as jnp
  from adiff_jax.data.synthetic import caption_for, render_clip, sample_params
  from adiff_jax.vae import encode_video
  rng = np.random.default_rng(seed)
  clips = [sample_params(rng, frames=frames, size=size, background=40, directions=directions or DIRECTIONS)
           for _ in range(n)]
  video = jnp.asarray(np.stack([render_clip(p, frames=frames, size=size) for p in clips]),
                      jnp.float32) / 127.5 - 1                                   # (n, F, S, S, 3)
  z = encode_video(pipe.vae, {"params": pipe.params["vae"]}, video)
  return z, pipe.encode_prompts([caption_for(p.color, p.shape, p.direction) for p in clips])


def _mse_per_t(apply, variables, z, ctx, ts=LOSS_T) -> list[float]:
  """Denoising MSE at each t in `ts`; the noise depends on t only, so models compare equal."""
  import jax
  import jax.numpy as jnp
  from adiff_jax.schedulers import add_noise
  out = []
  for t in ts:
    tt = jnp.full((z.shape[0],), t)
    noise = jax.random.normal(jax.random.key(t), z.shape)
    xt = add_noise(SamplingConfig().schedule, z, noise, tt)
    out.append(float(jnp.mean((apply(variables, xt, tt, ctx) - noise) ** 2)))
  return out


def loss_gap(pipe: Pipeline, apply, n: int = 24, frames: int = 16, size: int = 64) -> dict[str, list[float]]:
  """Two training-health checks that need no sampling, per t in LOSS_T, on `n` rendered clips
  with their captions (same latents, noise and t):
  - "image": the video model's denoising MSE relative to the image model alone (frames
    independent): < 0 where the motion module predicts the noise better from the other frames;
  - "order": the video model's MSE on the same clips with their frames in a fixed shuffled order,
    relative to the true order: > 0 only if the motion module uses the order of the frames (a
    path), not just their agreement (a bag of frames).
  `pipe`: the video model's pipeline; `apply`: its jitted `pipe.unet.apply`."""
  import jax
  z, ctx = _loss_batch(pipe, n, frames, size)
  image_pipe = Pipeline(*image_model_alone(pipe.config, pipe.params))
  variables = {"params": pipe.params["unet"]}
  video = _mse_per_t(apply, variables, z, ctx)
  image = _mse_per_t(jax.jit(image_pipe.unet.apply), {"params": image_pipe.params["unet"]}, z, ctx)
  perm = np.random.default_rng(0).permutation(frames)
  shuffled = _mse_per_t(apply, variables, z[:, perm], ctx)
  return {"image": [a / b - 1 for a, b in zip(video, image)],
          "order": [a / b - 1 for a, b in zip(shuffled, video)]}


# A clip's direction is chosen in the first sampling steps: by t = 900 it shows in x_t already.
LORA_LOSS_T = (990, 950, 900)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def lora_loss_gap(pipe: Pipeline, apply, lora, direction: str, n: int = 16, frames: int = 16,
                  size: int = 64) -> dict[str, list[float]]:
  """Denoising MSE with a MotionLoRA relative to the motion module alone, per t in LORA_LOSS_T, on
  clips moving the LoRA's way and on clips moving the opposite way. A LoRA that has learnt its
  direction lowers the first (< 0) and raises the second (> 0). `pipe`, `apply` as in loss_gap:
  one jitted apply for every LoRA, so each variable structure compiles once."""
  out = {}
  for d in (direction, OPPOSITE[direction]):
    z, ctx = _loss_batch(pipe, n, frames, size, directions=(d,), seed=1)
    base = _mse_per_t(apply, {"params": pipe.params["unet"]}, z, ctx, LORA_LOSS_T)
    with_lora = _mse_per_t(apply, {"params": pipe.params["unet"], "lora": lora}, z, ctx, LORA_LOSS_T)
    out[d] = [a / b - 1 for a, b in zip(with_lora, base)]
  return out


DIRECTION_T = (900, 600)


def direction_mse(pipe: Pipeline, apply, n: int = 16, frames: int = 16, size: int = 64) -> dict[str, list[float]]:
  """The model's denoising MSE on `n` clips moving each way, relative to its mean over the four
  directions, per t in DIRECTION_T. A model that has learnt a direction (e.g. a motion module
  fine-tuned on clips moving left only) has its lowest figure there; all ~0: no direction."""
  mse = {}
  for d in DIRECTIONS:
    z, ctx = _loss_batch(pipe, n, frames, size, directions=(d,), seed=1)
    mse[d] = _mse_per_t(apply, {"params": pipe.params["unet"]}, z, ctx, DIRECTION_T)
  mean = np.mean(list(mse.values()), axis=0)
  return {d: [float(a / m - 1) for a, m in zip(v, mean)] for d, v in mse.items()}


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
                  help="only the denoising-loss checks (no sampling, no row): the video model's MSE "
                       f"relative to the image model alone on rendered clips at t = {LOSS_T}, and each "
                       "MotionLoRA's MSE relative to the motion module alone on clips moving its way "
                       f"and the opposite way at t = {LORA_LOSS_T}, and the model's MSE per direction "
                       f"of the clips' motion at t = {DIRECTION_T}")
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
    import jax
    pipe = Pipeline(cfg, params)
    apply = jax.jit(pipe.unet.apply)
    gaps = loss_gap(pipe, apply, size=args.size, frames=args.frames)
    print(f"{name}: denoising MSE with the motion module vs the image model alone: " +
          ", ".join(f"t={t} {g:+.1%}" for t, g in zip(LOSS_T, gaps["image"])))
    print(f"{name}: the same clips with their frames shuffled vs in order: " +
          ", ".join(f"t={t} {g:+.1%}" for t, g in zip(LOSS_T, gaps["order"])))
    per_dir = direction_mse(pipe, apply, size=args.size, frames=args.frames)
    print(f"{name}: MSE on clips moving each way vs the four directions' mean: " + "; ".join(
        f"{d} " + " / ".join(f"t={t} {g:+.1%}" for t, g in zip(DIRECTION_T, gs)) for d, gs in per_dir.items()))
    for d, spec in loras.items():
      _, _, lora, _ = load([(spec, args.alpha)])
      gaps = lora_loss_gap(pipe, apply, lora, d, size=args.size, frames=args.frames)
      print(f"MotionLoRA {d} (alpha {args.alpha:g}) vs the motion module alone: " + "; ".join(
          f"clips moving {m}: " + ", ".join(f"t={t} {g:+.1%}" for t, g in zip(LORA_LOSS_T, gs))
          for m, gs in gaps.items()))
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
