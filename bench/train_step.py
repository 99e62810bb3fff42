"""Motion-module training step: JAX (this project's jitted step) vs PyTorch diffusers UNetMotionModel.

  python bench/train_step.py                                   # SD1.5 + v1 motion module, 1 x 16 x 256x256
  python bench/train_step.py --model sd15 --batch 1 --frames 8 --size 128 --steps 3   # CPU-sized
  python bench/train_step.py --model tiny --batch 4 --frames 16 --size 64

Both sides train the motion modules only (AdamW, global-norm clipping 1.0) on random weights
(speed does not depend on them) with the epsilon-MSE objective on precomputed latents (the VAE
encode is left out on both sides; --with-vae adds it to the JAX step). The JAX step also runs
the frozen CLIP text encoder on the token ids; the PyTorch step gets the text states ready-made.
PyTorch runs f32 on CPU and bf16 autocast on GPU; JAX computes in --dtype with f32 weights.
Each framework runs in its own process (bench/side_by_side.py); peak memory is each process's
peak resident set (runtime included). The JAX side tunes glibc malloc as train.py does
(adiff_jax/host_memory.py); the PyTorch side runs as diffusers users run it.
FLOPs per step come from XLA's cost analysis of the compiled JAX step; MFU = FLOP/s / device
peak (adiff_jax.train.metrics_log.PEAK_FLOPS; 'n/a' where unknown, e.g. CPU). Appends a row with
the command to bench/RESULTS.md under "## Training step, side by side with memory".
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adiff_jax import host_memory

if sys.argv[-2:] == ["--side", "jax"]:                  # the JAX child (bench/side_by_side.py)
  host_memory.keep_freed_memory()        # as train.py does, before JAX starts its threads

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from bench import side_by_side
from bench.results import add_row, command


def jax_step(args):
  from adiff_jax.model import random_params
  from adiff_jax.motion_module import MotionModuleConfig
  from adiff_jax.sharding import make_mesh
  from adiff_jax.train import state as S
  from adiff_jax.train.config import load_config
  from adiff_jax.train.metrics_log import compiled_flops, device_peak_flops
  from adiff_jax.train.step import make_spec, make_train_step

  mc = model_config(args)
  over = [f"dtype={args.dtype}", f"remat={str(args.remat).lower()}", "stage=motion_module"]
  if args.attention:
    over.append(f"attention_impl={args.attention}")
  cfg = load_config(None, over)
  t0 = time.perf_counter()
  trainable, frozen = S.split_model(cfg, random_params(mc, 0))
  print(f"jax: random weights in {time.perf_counter() - t0:.1f} s")
  mesh = make_mesh()
  rep = NamedSharding(mesh, P())
  spec = make_spec(cfg, mc)
  b, f, s = args.batch * mesh.shape["data"], args.frames, args.size
  lat = s // mc.latent_factor
  rng = np.random.default_rng(0)
  if args.with_vae:
    batch = {"video": rng.uniform(-1, 1, (b, f, s, s, 3)).astype(np.float32)}
  else:
    batch = {"latents": rng.standard_normal((b, f, lat, lat, 4)).astype(np.float32)}
  batch["ids"] = np.full((b, 77), 49407, np.int32)
  batch_sh = {k: NamedSharding(mesh, S.batch_spec(mesh, v.shape)) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    init = lambda p: S.init_state(cfg.optim, p)
    state_sh = S.state_shardings(mesh, jax.eval_shape(init, trainable), args.fsdp)
    frozen_sh = jax.tree.map(lambda _: rep, frozen)
    state = jax.jit(init, out_shardings=state_sh)(jax.device_put(trainable, state_sh["params"]))
    frozen = jax.device_put(frozen, frozen_sh)
    batch = jax.device_put(batch, batch_sh)
    del trainable
    gc.collect()
    host_memory.release_freed_memory()      # the numpy weights' pages, as the Trainer does
    _, jitted = make_train_step(spec, state_sh, frozen_sh, batch_sh, rep)
    t0 = time.perf_counter()
    compiled = jitted.lower(spec, state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    host_memory.release_freed_memory()      # the compiler's working memory, as the Trainer does
    flops = compiled_flops(compiled)
    mem = compiled.memory_analysis()
    if mem is not None:   # where the step's memory goes, as XLA planned it (GB)
      print("jax step buffers GB: " + ", ".join(
          f"{k} {getattr(mem, k + '_size_in_bytes') / 1e9:.2f}" for k in ("argument", "output", "alias", "temp")))
    times = []
    for i in range(args.steps + 1):
      t0 = time.perf_counter()
      state, metrics = compiled(state, frozen, batch)
      float(metrics["loss"])
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times[1:])
  peak = device_peak_flops()
  print(f"jax ({jax.devices()[0].device_kind}, {args.dtype}): {step_s:.3f} s/step, compile "
        f"{compile_s:.1f} s, {flops and flops / 1e12:.3f} TFLOP/step/device, loss {float(metrics['loss']):.4f}")
  return step_s, flops, peak, mc


def torch_step(args, mc):
  import torch
  from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
  u = mc.unet
  kinds = ["CrossAttn" if a else "" for a in u.cross_attention_levels]
  unet = UNet2DConditionModel(
      block_out_channels=u.block_out_channels, layers_per_block=u.layers_per_block,
      attention_head_dim=u.heads[0], cross_attention_dim=u.cross_attention_dim,
      norm_num_groups=u.norm_num_groups,
      down_block_types=tuple(k + "DownBlock2D" for k in kinds),
      up_block_types=tuple(k + "UpBlock2D" for k in reversed(kinds)))
  m = mc.motion
  adapter = MotionAdapter(block_out_channels=u.block_out_channels,
                          motion_layers_per_block=u.layers_per_block,
                          motion_num_attention_heads=m.num_heads, motion_norm_num_groups=m.norm_groups,
                          motion_max_seq_length=m.max_len, use_motion_mid_block=m.mid_block)
  gpu = torch.cuda.is_available()
  dev = "cuda" if gpu else "cpu"
  model = UNetMotionModel.from_unet2d(unet, adapter).to(device=dev, dtype=torch.float32).train()
  del unet
  for name, p in model.named_parameters():
    p.requires_grad_("motion_modules" in name)
  params = [p for p in model.parameters() if p.requires_grad]
  if args.remat:
    model.enable_gradient_checkpointing()
  opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
  b, f = args.batch, args.frames
  lat = args.size // mc.latent_factor
  g = torch.Generator().manual_seed(0)
  latents = torch.randn(b, 4, f, lat, lat, generator=g).to(dev)
  ctx = torch.randn(b * f, 77, u.cross_attention_dim, generator=g).to(dev)  # per-frame (diffusers >= 0.42)

  def step():
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (b,), device=dev)
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=gpu):
      pred = model(latents + noise, t, ctx).sample   # the noising itself is negligible
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if gpu:
      torch.cuda.synchronize()
    return float(loss.detach())

  times = []
  for _ in range(args.steps + 1):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times[1:])
  print(f"torch ({dev}, {'bf16 autocast' if gpu else 'f32'}): {step_s:.3f} s/step")
  del model, opt, params
  gc.collect()
  return step_s


SECTION = "Training step, side by side with memory (bench/train_step.py)"
HEADER = ("Motion modules trainable, AdamW + clipping, epsilon MSE on precomputed latents; random "
          "weights. Each framework in its own process; peak RSS = that process's peak resident "
          "memory (runtime included). TFLOP = per step per device (XLA cost analysis).\n\n"
          "| date | device | model | B x F x H x W | JAX dtype | TFLOP | JAX samples/s | PyTorch "
          "samples/s | speed-up | JAX peak RSS GiB | PyTorch peak RSS GiB | command |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def model_config(args):
  from adiff_jax.model import ModelConfig
  return ModelConfig.sd15("v1") if args.model == "sd15" else ModelConfig.tiny()


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
  ap.add_argument("--batch", type=int, default=1, help="clips per device")
  ap.add_argument("--frames", type=int, default=16)
  ap.add_argument("--size", type=int, default=256, help="pixel height/width")
  ap.add_argument("--dtype", choices=["f32", "bf16"], default="bf16")
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--fsdp", action="store_true")
  ap.add_argument("--attention", default=None, help="attention implementation (adiff_jax.attention)")
  ap.add_argument("--with-vae", action="store_true", help="JAX step encodes pixels with the VAE")
  ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)   # a child process
  ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  args = ap.parse_args()

  if args.side == "jax":
    step_s, flops, peak, _ = jax_step(args)
    return side_by_side.report(step_s=step_s, flops=flops, peak=peak,
                               device=jax.devices()[0].device_kind, devices=jax.device_count())
  if args.side == "torch":
    return side_by_side.report(step_s=torch_step(args, model_config(args)))

  argv = sys.argv[1:]
  j = side_by_side.run(__file__, argv, "jax")
  t = None if args.skip_torch else side_by_side.run(__file__, argv, "torch")
  jax_s, flops, peak, n = j["step_s"], j["flops"], j["peak"], args.batch * j["devices"]
  torch_s = t and t["step_s"]
  mfu = f"{100 * flops / jax_s / peak:.1f}%" if flops and peak else "n/a"
  ratio = f"{torch_s / jax_s:.2f}x" if torch_s else "n/a"
  print(f"samples/s: JAX {n / jax_s:.3f}, PyTorch {torch_s and args.batch / torch_s}; MFU JAX {mfu}; "
        f"speed-up {ratio}; peak RSS GiB: JAX {j['peak_rss_gib']:.2f}, PyTorch {t and t['peak_rss_gib']}")
  t_rss = f"{t['peak_rss_gib']:.2f}" if t else "n/a"
  row = (f"| {time.strftime('%Y-%m-%d')} | {j['device']} x{j['devices']} | "
         f"{args.model} | {args.batch}x{args.frames}x{args.size}x{args.size} | {args.dtype} | "
         f"{flops and f'{flops / 1e12:.3f}'} | {n / jax_s:.3f} | "
         f"{torch_s and f'{args.batch / torch_s:.3f}'} | {ratio} | {j['peak_rss_gib']:.2f} | "
         f"{t_rss} | `{command(__file__)}` |\n")
  add_row(args.results, SECTION, HEADER, row)


if __name__ == "__main__":
  main()
