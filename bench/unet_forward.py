"""UNet forward time, JAX (this project) vs PyTorch diffusers UNetMotionModel, same config and device.

  python bench/unet_forward.py --config sd15 --frames 16 --latent 32 --batch 1 --dtype f32

Each framework runs in its own process (bench/side_by_side.py; until 2026-12-04 both ran in one
process, where JAX's thread pool sat beside PyTorch's) on the current device (CPU unless a GPU is
visible). Weights are random (speed does not depend on them). Appends a row to bench/RESULTS.md
with the command.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from adiff_jax.motion_module import MotionModuleConfig
from adiff_jax.unet import UNet3D, UNetConfig
from bench import side_by_side
from bench.results import add_row, command


def torch_model(config: str, device, dtype):
  from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
  if config == "sd15":
    kw = dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
              cross_attention_dim=768, norm_num_groups=32,
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    heads, groups = 8, 32
  else:
    kw = dict(block_out_channels=(32, 64), attention_head_dim=2, cross_attention_dim=32,
              norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    heads, groups = 2, 8
  unet = UNet2DConditionModel(layers_per_block=2, **kw)
  adapter = MotionAdapter(block_out_channels=kw["block_out_channels"], motion_layers_per_block=2,
                          motion_num_attention_heads=heads, motion_norm_num_groups=groups,
                          motion_max_seq_length=32, use_motion_mid_block=True)
  return UNetMotionModel.from_unet2d(unet, adapter).to(device=device, dtype=dtype).eval()


def timeit(fn, iters):
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", choices=["sd15", "tiny"], default="sd15")
  ap.add_argument("--frames", type=int, default=16)
  ap.add_argument("--latent", type=int, default=32, help="latent height/width (pixels / 8)")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                  help="JAX compute dtype; PyTorch runs f32 on CPU, fp16 on GPU")
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  ap.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)   # a child process
  args = ap.parse_args()

  b, f, s = args.batch, args.frames, args.latent
  cfg = UNetConfig.sd15() if args.config == "sd15" else UNetConfig.tiny()
  mm = MotionModuleConfig.v2() if args.config == "sd15" else MotionModuleConfig.v2(num_heads=2, norm_groups=8)
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((b, f, s, s, 4)).astype(np.float32)
  t = np.full((b,), 500.0, np.float32)
  ctx = rng.standard_normal((b, 77, cfg.cross_attention_dim)).astype(np.float32)

  if args.side == "torch":
    import torch
    gpu = torch.cuda.is_available()
    tdev, tdt = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
    ref = torch_model(args.config, tdev, tdt)
    if gpu:
      torch.backends.cuda.enable_flash_sdp(True)
    xs = torch.from_numpy(sample).permute(0, 4, 1, 2, 3).to(tdev, tdt)
    ts = torch.from_numpy(t).to(tdev)
    cs = torch.from_numpy(np.repeat(ctx, f, axis=0)).to(tdev, tdt)

    def run_torch():
      with torch.no_grad():
        ref(xs, ts, cs)
      if gpu:
        torch.cuda.synchronize()
    run_torch()  # warm-up
    return side_by_side.report(seconds=timeit(run_torch, args.iters), device=tdev, dtype=str(tdt))
  if args.side == "jax":
    import jax
    import jax.numpy as jnp
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    model = UNet3D(cfg, mm, dtype=dtype)
    params = jax.jit(model.init)(jax.random.key(0), sample[:, :2, :8, :8], t, ctx)["params"]
    if args.config == "sd15" and dtype == jnp.bfloat16:
      params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    fwd = jax.jit(model.apply)
    xj, tj, cj = jnp.asarray(sample), jnp.asarray(t), jnp.asarray(ctx)
    t0 = time.perf_counter()
    fwd({"params": params}, xj, tj, cj).block_until_ready()
    compile_s = time.perf_counter() - t0
    seconds = timeit(lambda: fwd({"params": params}, xj, tj, cj).block_until_ready(), args.iters)
    d = jax.devices()[0]
    return side_by_side.report(seconds=seconds, compile_s=compile_s, device=d.device_kind,
                               platform=d.platform)

  argv = sys.argv[1:]
  torch_s = None
  if not args.skip_torch:
    tr = side_by_side.run(__file__, argv, "torch")
    torch_s = tr["seconds"]
    print(f"torch ({tr['device']}, {tr['dtype']}): {torch_s:.3f} s/forward")
  jr = side_by_side.run(__file__, argv, "jax")
  jax_s = jr["seconds"]
  print(f"jax ({jr['platform']}, {args.dtype}): {jax_s:.3f} s/forward (first call incl. compile "
        f"{jr['compile_s']:.1f} s)")

  ratio = f"{torch_s / jax_s:.2f}x" if torch_s else "n/a"
  print(f"speed-up JAX vs PyTorch: {ratio}")
  cmd = command(__file__)
  row = (f"| {time.strftime('%Y-%m-%d')} | {jr['device']} | {args.config} | {b}x{f}x{s}x{s} | "
         f"{args.dtype} | {torch_s and f'{torch_s:.3f}'} | {jax_s:.3f} | {ratio} | `{cmd}` |\n")
  add_row(args.results, "UNet forward (bench/unet_forward.py)",
          "| date | device | config | B x F x h x w | JAX dtype | PyTorch s | JAX s | speed-up | command |\n"
          "|---|---|---|---|---|---|---|---|---|", row)


if __name__ == "__main__":
  main()
