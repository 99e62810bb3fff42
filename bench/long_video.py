"""Long videos with context windows: time per frame and memory as the number of frames grows.

  python bench/long_video.py                                  # tiny model, 16..256 frames, CPU
  python bench/long_video.py --frames 16 64 --steps 2 --no-row   # quick look

Denoising loop only (text encoding and VAE decode excluded: they scale linearly and are not
windowed), random weights, CFG 7.5, DDIM, context windows of --context-length frames with
--context-overlap (uniform schedule, pyramid fusion), one window per UNet call. Reports seconds
per frame (median of --repeats runs after a warm-up that compiles) relative to the 16-frame
video, and from XLA's memory analysis of the compiled loop: temporary (activation) bytes, which
the windows should keep flat, and argument bytes (the latents and the text grow with N).
Appends a row per frame count to bench/RESULTS.md with the command.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from adiff_jax.context import ContextConfig
from adiff_jax.model import ModelConfig, random_params
from adiff_jax.sampling import Pipeline, SamplingConfig
from bench.results import add_row, command

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--frames", type=int, nargs="+", default=[16, 64, 128, 256])
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--context-length", type=int, default=16)
  ap.add_argument("--context-overlap", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no-row", action="store_true", help="print only; do not append to bench/RESULTS.md")
  args = ap.parse_args(argv)

  cfg = ModelConfig.tiny()
  pipe = Pipeline(cfg, random_params(cfg, seed=0))
  ctx = ContextConfig(context_length=args.context_length, overlap=args.context_overlap)
  cond, uncond = pipe.encode_prompts(["a red circle"]), pipe.encode_prompts([""])
  base = None
  rows = []
  for n in args.frames:
    sc = SamplingConfig(frames=n, height=args.size, width=args.size, steps=args.steps, context=ctx)
    pipe.check(sc)
    noise = pipe.initial_noise([0], sc)
    t0 = time.perf_counter()
    jax.block_until_ready(pipe.denoise(noise, cond, uncond, sc, progress=False))
    compile_s = time.perf_counter() - t0
    loop = list(pipe._loops.values())[-1]        # the loop this frame count compiled
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(pipe.denoise(noise, cond, uncond, sc, progress=False))
      times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    mem = loop.lower(pipe.params["unet"], pipe.lora, noise, cond, uncond, jnp.float32(7.5),
                     jax.random.key(0)).compile().memory_analysis()
    per_frame = sec / n
    base = base or per_frame
    rows.append((n, sec, per_frame, per_frame / base, mem.temp_size_in_bytes, mem.argument_size_in_bytes,
                 compile_s))
    print(f"{n:4d} frames: {sec:7.2f} s, {1000 * per_frame:7.1f} ms/frame ({per_frame / base:.2f}x the "
          f"{args.frames[0]}-frame cost), temp {mem.temp_size_in_bytes / 2**20:7.1f} MiB, args "
          f"{mem.argument_size_in_bytes / 2**20:6.1f} MiB, first run (compile) {compile_s:.1f} s", flush=True)
  if args.no_row:
    return
  cmd = command(__file__)
  header = ("Denoising loop of a long video with whole-UNet context windows, tiny model, random "
            "weights. `vs first`: seconds per frame relative to the first frame count (goal at 256 "
            "frames: <= 1.3x the 16-frame cost). XLA temp: the compiled loop's temporary buffers "
            "(activations; windows keep them flat), args: its inputs (latents, text).\n\n"
            "| date | setting | frames | s (denoise) | ms / frame | vs first | XLA temp MiB | XLA args MiB | command |\n"
            "|---|---|---|---|---|---|---|---|---|")
  for n, sec, pf, rel, temp, arg, comp in rows:
    row = (f"| {time.strftime('%Y-%m-%d')} | tiny {args.size}x{args.size}, {args.steps} DDIM steps, cfg 7.5, "
           f"L{args.context_length} o{args.context_overlap} uniform, CPU ({os.cpu_count()} cores) | {n} | "
           f"{sec:.2f} | {1000 * pf:.1f} | {rel:.2f}x | {temp / 2**20:.1f} | {arg / 2**20:.2f} | `{cmd}` |")
    add_row(RESULTS, "Long videos: context windows (bench/long_video.py)", header, row)


if __name__ == "__main__":
  main()
