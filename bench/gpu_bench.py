"""Side-by-side GPU benchmark, adiff-jax vs diffusers, prepared to run first on an H200.

  bash bench/gpu.sh               # the GPU run: SD1.5 + v2 motion module, ~8 min budget
  bash bench/gpu.sh --reduced     # the same code path on CPU, tiny model (the test suite runs it)
  python bench/gpu_bench.py --append-rows OUTDIR/rows.md   # add a run's rows to bench/RESULTS.md

Four parts, each in its OWN process (allocators and runtimes interfere otherwise), in this order:
  jax_sample    adiff-jax Pipeline, bf16: 1x16x512x512, 25 DDIM steps, CFG 7.5
  torch_sample  diffusers AnimateDiffPipeline, fp16 + SDPA, same video and DDIM settings
  jax_train     one motion-module training step (our jitted step), bf16, 1x16x256x256
  torch_train   diffusers UNetMotionModel step, bf16 autocast, motion modules trainable, AdamW
  jax_attention every attention shape of that video (spatial self, 77-token cross, 16-token
                temporal; B = 2 x 16 frames for CFG) through cuDNN and through XLA, bf16, forward
                and forward+backward: which to route where (adiff_jax/attention.py)
Random weights throughout (speed does not depend on them). Each part appends one JSON line per
measurement to OUT/results.jsonl as soon as it has it, so a part killed by its timeout keeps
what it measured. The parent gives every part a timeout out of one total budget; time a part
does not use passes on to the next, and no part can eat the time reserved for those after it.

MFU = analytic FLOPs (shared/reference/performance.md: UNet 0.80 + v2 motion 0.31 TFLOP per
frame-forward at 512^2, VAE decode 2.5 TFLOP per frame, training 9.4 TFLOP per 16x256^2 clip;
scaled by pixels at other sizes, exact only at those) / seconds / the device's paper peak
(adiff_jax.train.metrics_log.PEAK_FLOPS: H200 989 TFLOP/s dense bf16). Achieved TFLOP/s is
reported too (compare with the ~790 TFLOP/s large-GEMM rate measured on our H200). Unknown
peak (CPU) or a model without analytic FLOPs (tiny): null.

DDIM settings (both sides): the official AnimateDiff inference config, i.e. beta linear
0.00085..0.012, steps_offset 1, clip_sample False, set_alpha_to_one, "leading" spacing
(diffusers 0.11.1, the version the official code pinned; docs/schedulers.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PARTS = ("jax_sample", "torch_sample", "jax_train", "torch_train", "jax_attention")
# Share of the total budget reserved for each part (JAX compiles dominate its parts).
SHARE = {"jax_sample": 0.34, "torch_sample": 0.15, "jax_train": 0.28, "torch_train": 0.14,
         "jax_attention": 0.09}
PROMPT, NEGATIVE = "a red circle moving left", "blurry"
SECTION = "GPU side by side (bench/gpu.sh)"
HEADER = ("adiff-jax vs diffusers, each in its own process, random weights. MFU = analytic FLOPs "
          "(shared/reference/performance.md) / s / paper peak (H200: 989 TFLOP/s dense bf16). "
          "Peak GiB: JAX `peak_bytes_in_use` (no preallocation), torch `max_memory_allocated`.\n\n"
          "| date | device | measurement | shape | dtypes (JAX / diffusers) | adiff-jax | diffusers "
          "| speed-up | JAX MFU | diffusers MFU | JAX peak GiB | diffusers peak GiB | command |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")

# Analytic FLOPs (performance.md), SD1.5 + v2 motion module.
UNET_FWD_512 = 0.80e12 + 0.31e12     # per frame-forward at 512x512
VAE_DEC_512 = 2.5e12                 # per frame at 512x512
TRAIN_16x256 = 9.4e12                # per 16x256x256 clip, motion modules trained


@dataclasses.dataclass(frozen=True)
class Sizes:
  model: str          # "sd15" (SD1.5 + v2 motion module) or "tiny"
  frames: int
  size: int
  steps: int
  dtype: str          # JAX compute dtype
  train_frames: int
  train_size: int
  train_steps: int    # timed steps after one warm-up
  runs: int = 3       # timed sampling runs after one warm-up (median)
  batch: int = 1
  reduced: bool = False


FULL = Sizes("sd15", 16, 512, 25, "bf16", 16, 256, 5)
REDUCED = Sizes("tiny", 4, 64, 2, "f32", 4, 64, 2, reduced=True)


def model_config(sz: Sizes):
  from adiff_jax.model import ModelConfig
  return ModelConfig.sd15("v2") if sz.model == "sd15" else ModelConfig.tiny()


def sample_flops(sz: Sizes):
  """(FLOPs per CFG denoising step, FLOPs of the VAE decode); (None, None) for the tiny model."""
  if sz.model != "sd15":
    return None, None
  area = sz.size * sz.size / 512**2
  return 2 * sz.batch * sz.frames * UNET_FWD_512 * area, sz.batch * sz.frames * VAE_DEC_512 * area


def train_flops(sz: Sizes):
  if sz.model != "sd15":
    return None
  return TRAIN_16x256 * sz.batch * sz.train_frames * sz.train_size**2 / (16 * 256**2)


# ----------------------------------------------------------------------------- child side


class Emitter:
  """Appends one JSON line per measurement to results.jsonl, flushed at once."""

  def __init__(self, path: str, part: str):
    self.path, self.part, self.t0 = path, part, time.perf_counter()

  def __call__(self, name: str, value, unit: str = None, **extra):
    rec = {"part": self.part, "name": name, "value": value, "unit": unit,
           "t": round(time.perf_counter() - self.t0, 2), **extra}
    with open(self.path, "a") as fh:   # O_APPEND: one whole line per write
      fh.write(json.dumps(rec) + "\n")
      fh.flush()
    print(f"[{self.part}] {name} = {value}{' ' + unit if unit else ''}", flush=True)


def timed(fn, sync=lambda x: x):
  t0 = time.perf_counter()
  sync(fn())
  return time.perf_counter() - t0


def pct(flops, seconds, peak):
  return round(100 * flops / seconds / peak, 2) if flops and peak and seconds > 0 else None


def tflops(flops, seconds):
  return round(flops / seconds / 1e12, 1) if flops and seconds > 0 else None


def jax_env(emit):
  import jax
  from adiff_jax.train.metrics_log import device_peak_flops
  d = jax.devices()[0]
  peak = device_peak_flops(d)
  emit("env", {"jax": jax.__version__, "platform": d.platform, "device": d.device_kind,
               "devices": jax.device_count(), "peak_tflops": peak and peak / 1e12,
               "preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")})
  return d, peak


def jax_peak_gib(dev):
  stats = dev.memory_stats() or {}   # None on CPU
  peak = stats.get("peak_bytes_in_use")
  return round(peak / 2**30, 2) if peak else None


def part_jax_sample(sz: Sizes, emit):
  import numpy as np
  from adiff_jax.model import random_params
  from adiff_jax.sampling import Pipeline, SamplingConfig
  dev, peak = jax_env(emit)
  mc = model_config(sz)
  t0 = time.perf_counter()
  pipe = Pipeline(mc, random_params(mc, 0), dtype=sz.dtype)   # weights cast to the compute dtype
  emit("init_s", round(time.perf_counter() - t0, 2), "s")
  sc = SamplingConfig(frames=sz.frames, height=sz.size, width=sz.size, steps=sz.steps, guidance_scale=7.5)
  prompts, negative, seeds = [PROMPT] * sz.batch, [NEGATIVE] * sz.batch, list(range(sz.batch))
  run = lambda: pipe(prompts, negative, seeds, sc, progress=False)   # -> (B, F, H, W, 3) numpy
  try:
    first = timed(run)   # compiles text encoder, the scanned DDIM loop and the VAE decoder
  except FloatingPointError as e:
    # Random weights may overflow somewhere; the speed is the same, so time the same stages
    # without the pipeline's finiteness check rather than lose the part.
    emit("warning", f"{e}"[:300] + " -> timing the stages without the finiteness check")
    run = lambda: np.asarray(pipe.decode(pipe.denoise(
        pipe.initial_noise(seeds, sc), pipe.encode_prompts(prompts), pipe.encode_prompts(negative),
        sc, progress=False), sc))
    first = timed(run)
  emit("first_call_s", round(first, 3), "s")
  e2e = [timed(run) for _ in range(sz.runs)]
  e2e_s = statistics.median(e2e)
  step_flops, vae_flops = sample_flops(sz)
  total = step_flops and step_flops * sz.steps + vae_flops
  emit("e2e_s", round(e2e_s, 4), "s", runs=[round(x, 4) for x in e2e])
  emit("compile_s", round(first - e2e_s, 2), "s", note="first call minus median steady call")
  # Stages alone, synced with block_until_ready.
  cond, uncond = pipe.encode_prompts(prompts), pipe.encode_prompts(negative)   # (B, 77, D)
  noise = pipe.initial_noise(seeds, sc)                                         # (B, F, h, w, 4)
  out = {}

  def denoise():   # keeps the latents (B, F, h, w, 4) for the decode timing below
    out["lat"] = pipe.denoise(noise, cond, uncond, sc, progress=False)
    return out["lat"]

  den = [timed(denoise, lambda lat: lat.block_until_ready()) for _ in range(sz.runs)]
  den_s = statistics.median(den)
  emit("denoise_s", round(den_s, 4), "s", steps=sz.steps)
  emit("denoise_s_per_step", round(den_s / sz.steps, 5), "s")
  vae = [timed(lambda: pipe.decode(out["lat"], sc).block_until_ready()) for _ in range(sz.runs)]
  vae_s = statistics.median(vae)
  emit("vae_decode_s", round(vae_s, 4), "s", chunk=sc.vae_chunk)
  emit("mfu_e2e_pct", pct(total, e2e_s, peak), "%", achieved_tflops=tflops(total, e2e_s))
  emit("mfu_denoise_pct", pct(step_flops, den_s / sz.steps, peak), "%",
       achieved_tflops=tflops(step_flops, den_s / sz.steps))
  emit("mfu_vae_pct", pct(vae_flops, vae_s, peak), "%", achieved_tflops=tflops(vae_flops, vae_s))
  emit("peak_mem_gib", jax_peak_gib(dev), "GiB")


def torch_env(emit, sz: Sizes):
  import torch
  import diffusers
  from adiff_jax.train.metrics_log import PEAK_FLOPS
  gpu = torch.cuda.is_available() and not sz.reduced
  name = torch.cuda.get_device_name(0) if gpu else "cpu"
  peak = next((PEAK_FLOPS[k] for k in sorted(PEAK_FLOPS, key=len, reverse=True) if k in name.lower()), None)
  emit("env", {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": name,
               "peak_tflops": peak and peak / 1e12, "cudnn_benchmark": gpu})
  if gpu:
    torch.backends.cudnn.benchmark = True   # autotuned convs: the strongest plain-eager baseline
  elif sz.reduced:
    torch.set_num_threads(1)   # OpenMP barriers spin badly on a shared, busy CPU (test machine)
  sync = torch.cuda.synchronize if gpu else (lambda: None)
  return gpu, ("cuda" if gpu else "cpu"), peak, sync


def torch_peak_gib(gpu):
  import torch
  return round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None


def part_torch_sample(sz: Sizes, emit):
  import torch
  from bench.sample import torch_pipeline   # the same builder as the CPU benchmark
  gpu, dev, peak, sync = torch_env(emit, sz)
  t0 = time.perf_counter()
  pipe = torch_pipeline(model_config(sz), dev, torch.float16 if gpu else torch.float32)
  pipe.set_progress_bar_config(disable=True)
  emit("init_s", round(time.perf_counter() - t0, 2), "s",
       attention=sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()}),
       scheduler=dict(pipe.scheduler.config))
  kw = dict(prompt=[PROMPT] * sz.batch, negative_prompt=[NEGATIVE] * sz.batch, num_frames=sz.frames,
            height=sz.size, width=sz.size, num_inference_steps=sz.steps, guidance_scale=7.5)
  if gpu:
    torch.cuda.reset_peak_memory_stats()
  run = lambda **extra: pipe(**kw, **{"output_type": "np", **extra})
  first = timed(lambda: (run(), sync()))
  emit("first_call_s", round(first, 3), "s")
  e2e = [timed(lambda: (run(), sync())) for _ in range(sz.runs)]
  e2e_s = statistics.median(e2e)
  step_flops, vae_flops = sample_flops(sz)
  total = step_flops and step_flops * sz.steps + vae_flops
  emit("e2e_s", round(e2e_s, 4), "s", runs=[round(x, 4) for x in e2e])
  emit("compile_s", round(first - e2e_s, 2), "s", note="warm-up: first call minus median steady call")
  # Per step: synced timestamps at the end of each step; the median gap is one step.
  stamps = []

  def on_step(_pipe, i, t, kwargs):
    sync()
    stamps.append(time.perf_counter())
    return kwargs

  per_step = []
  for _ in range(sz.runs):
    stamps.clear()
    lat = run(output_type="latent", callback_on_step_end=on_step).frames   # (B, C, F, h, w)
    per_step += [b - a for a, b in zip(stamps, stamps[1:])]
  step_s = statistics.median(per_step) if per_step else None
  emit("denoise_s_per_step", step_s and round(step_s, 5), "s")
  emit("denoise_s", step_s and round(step_s * sz.steps, 4), "s", steps=sz.steps, note="per step x steps")
  with torch.no_grad():
    vae = [timed(lambda: (pipe.decode_latents(lat, decode_chunk_size=16), sync())) for _ in range(sz.runs)]
  vae_s = statistics.median(vae)
  emit("vae_decode_s", round(vae_s, 4), "s", chunk=16)
  emit("mfu_e2e_pct", pct(total, e2e_s, peak), "%", achieved_tflops=tflops(total, e2e_s))
  emit("mfu_denoise_pct", step_s and pct(step_flops, step_s, peak), "%",
       achieved_tflops=step_s and tflops(step_flops, step_s))
  emit("mfu_vae_pct", pct(vae_flops, vae_s, peak), "%", achieved_tflops=tflops(vae_flops, vae_s))
  emit("peak_mem_gib", torch_peak_gib(gpu), "GiB")


def part_jax_train(sz: Sizes, emit):
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from adiff_jax.model import random_params
  from adiff_jax.sharding import make_mesh
  from adiff_jax.train import state as S
  from adiff_jax.train.config import load_config
  from adiff_jax.train.metrics_log import compiled_flops
  from adiff_jax.train.step import make_spec, make_train_step
  dev, peak = jax_env(emit)
  mc = model_config(sz)
  cfg = load_config(None, [f"dtype={sz.dtype}", "stage=motion_module"])
  t0 = time.perf_counter()
  trainable, frozen = S.split_model(cfg, random_params(mc, 0))   # motion modules f32, rest frozen
  emit("init_s", round(time.perf_counter() - t0, 2), "s")
  mesh = make_mesh()
  rep = NamedSharding(mesh, P())
  spec = make_spec(cfg, mc)
  b, f, lat = sz.batch * mesh.shape["data"], sz.train_frames, sz.train_size // mc.latent_factor
  rng = np.random.default_rng(0)
  # Precomputed latents (B, F, h, w, 4) + token ids: the step runs the frozen CLIP, not the VAE.
  batch = {"latents": rng.standard_normal((b, f, lat, lat, 4)).astype(np.float32),
           "ids": np.full((b, 77), 49407, np.int32)}
  batch_sh = {k: NamedSharding(mesh, S.batch_spec(mesh, v.shape)) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    init = lambda p: S.init_state(cfg.optim, p)
    state_sh = S.state_shardings(mesh, jax.eval_shape(init, trainable), False)
    frozen_sh = jax.tree.map(lambda _: rep, frozen)
    state = jax.jit(init, out_shardings=state_sh)(jax.device_put(trainable, state_sh["params"]))
    frozen = jax.device_put(frozen, frozen_sh)
    batch = jax.device_put(batch, batch_sh)
    del trainable
    _, jitted = make_train_step(spec, state_sh, frozen_sh, batch_sh, rep)
    t0 = time.perf_counter()
    compiled = jitted.lower(spec, state, frozen, batch).compile()
    emit("compile_s", round(time.perf_counter() - t0, 2), "s")
    xla = compiled_flops(compiled)
    times = []
    for _ in range(sz.train_steps + 1):   # the first is a warm-up
      t0 = time.perf_counter()
      state, metrics = compiled(state, frozen, batch)   # state donated
      loss = float(metrics["loss"])                      # sync
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times[1:])
  flops = train_flops(sz)
  emit("step_s", round(step_s, 4), "s", steps=[round(x, 4) for x in times], loss=loss,
       shape=f"{b}x{f}x{sz.train_size}x{sz.train_size}")
  emit("mfu_pct", pct(flops, step_s, peak), "%", achieved_tflops=tflops(flops, step_s),
       xla_cost_tflop=xla and round(xla / 1e12, 3))
  emit("peak_mem_gib", jax_peak_gib(dev), "GiB")


def part_torch_train(sz: Sizes, emit):
  import torch
  from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
  gpu, dev, peak, sync = torch_env(emit, sz)
  mc = model_config(sz)
  u, m = mc.unet, mc.motion
  kinds = ["CrossAttn" if a else "" for a in u.cross_attention_levels]
  t0 = time.perf_counter()
  unet = UNet2DConditionModel(
      block_out_channels=u.block_out_channels, layers_per_block=u.layers_per_block,
      attention_head_dim=u.heads[0], cross_attention_dim=u.cross_attention_dim,
      norm_num_groups=u.norm_num_groups, down_block_types=tuple(k + "DownBlock2D" for k in kinds),
      up_block_types=tuple(k + "UpBlock2D" for k in reversed(kinds)))
  adapter = MotionAdapter(block_out_channels=u.block_out_channels, motion_layers_per_block=u.layers_per_block,
                          motion_num_attention_heads=m.num_heads, motion_norm_num_groups=m.norm_groups,
                          motion_max_seq_length=m.max_len, use_motion_mid_block=m.mid_block)
  # f32 weights (AdamW state f32); bf16 autocast on GPU as mixed-precision training does.
  model = UNetMotionModel.from_unet2d(unet, adapter).to(device=dev, dtype=torch.float32).train()
  del unet
  for name, p in model.named_parameters():
    p.requires_grad_("motion_modules" in name)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
  emit("init_s", round(time.perf_counter() - t0, 2), "s",
       trainable_params=sum(p.numel() for p in params))
  b, f, lat = sz.batch, sz.train_frames, sz.train_size // mc.latent_factor
  g = torch.Generator().manual_seed(0)
  latents = torch.randn(b, 4, f, lat, lat, generator=g).to(dev)                     # (B, C, F, h, w)
  ctx = torch.randn(b * f, 77, u.cross_attention_dim, generator=g).to(dev)          # per frame
  if gpu:
    torch.cuda.reset_peak_memory_stats()

  def step():
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (b,), device=dev)
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=gpu):
      pred = model(latents + noise, t, ctx).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return float(loss.detach())

  times = [timed(step) for _ in range(sz.train_steps + 1)]   # the first is a warm-up
  step_s = statistics.median(times[1:])
  flops = train_flops(sz)
  emit("step_s", round(step_s, 4), "s", steps=[round(x, 4) for x in times],
       shape=f"{b}x{f}x{sz.train_size}x{sz.train_size}")
  emit("mfu_pct", pct(flops, step_s, peak), "%", achieved_tflops=tflops(flops, step_s))
  emit("peak_mem_gib", torch_peak_gib(gpu), "GiB")


def attention_shapes(sz: Sizes) -> list[tuple[str, int, int, int, int, int]]:
  """(kind, B, Lq, Lk, heads, head dim) of every distinct attention in the sampled video."""
  mc = model_config(sz)
  u, m = mc.unet, mc.motion
  b = 2 * sz.batch * sz.frames                           # CFG doubles the batch; frames are images
  lat = sz.size // mc.latent_factor
  out = []
  for level, (ch, heads) in enumerate(zip(u.block_out_channels, u.heads)):
    side = lat >> level
    n = side * side
    if u.cross_attention_levels[level]:
      out += [(f"self {side}x{side}", b, n, n, heads, ch // heads),
              (f"cross {side}x{side}", b, n, 77, heads, ch // heads)]
    out.append((f"temporal {side}x{side}", 2 * sz.batch * n, sz.frames, sz.frames, m.num_heads,
                ch // m.num_heads))
  # The mid block's transformer at the lowest level (SD1.5: 8x8, head dim 160).
  out += [(f"mid self {side}x{side}", b, n, n, heads, ch // heads),
          (f"mid cross {side}x{side}", b, n, 77, heads, ch // heads)]
  return out


def part_jax_attention(sz: Sizes, emit):
  import jax
  import jax.numpy as jnp
  from adiff_jax.attention import describe_error, dot_product_attention
  jax_env(emit)
  dtype = jnp.bfloat16 if sz.dtype == "bf16" else jnp.float32
  # The routing question first (short sequences: 16-token temporal, 77-token cross), then the
  # long spatial ones, which cuDNN's flash kernel is for; each result is written as it comes.
  order = sorted(attention_shapes(sz), key=lambda a: (not a[0].startswith(("temporal", "cross", "mid cross")), a[2]))
  for kind, b, lq, lk, h, d in order:
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, lq, h, d), dtype)
    k, v = (jax.random.normal(kk, (b, lk, h, d), dtype) for kk in keys[1:])
    outs = {}
    for impl in ("cudnn", "xla"):
      fwd = jax.jit(lambda q, k, v, impl=impl: dot_product_attention(q, k, v, attention_impl=impl))
      grad = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(
          dot_product_attention(q, k, v, attention_impl=impl).astype(jnp.float32)), argnums=(0, 1, 2)))
      rec = {}
      for what, fn in (("fwd", fwd), ("fwd_bwd", grad)):
        try:
          first = jax.block_until_ready(fn(q, k, v))            # compile + warm-up
          rec[what] = round(1e3 * statistics.median(
              timed(lambda: fn(q, k, v), jax.block_until_ready) for _ in range(5)), 3)
          if what == "fwd":
            outs[impl] = first.astype(jnp.float32)
        except Exception as e:   # cuDNN refusing a shape (or CPU) is a result, not a failure
          rec[what] = None
          rec[what + "_error"] = describe_error(e)[:300]
      if impl == "xla" and len(outs) == 2:   # a correctness check on the GPU, for free
        rec["max_abs_diff_vs_cudnn"] = float(jnp.max(jnp.abs(outs["cudnn"] - outs["xla"])))
      emit(f"attn {kind} {impl}", rec, "ms", shape=[b, lq, lk, h, d])


def run_child(part: str, sz: Sizes, out: str) -> None:
  emit = Emitter(os.path.join(out, "results.jsonl"), part)
  try:
    globals()["part_" + part](sz, emit)
  except BaseException as e:
    emit("error", f"{type(e).__name__}: {e}"[:2000])
    traceback.print_exc()
    sys.exit(1)


# ----------------------------------------------------------------------------- parent side


def have_diffusers() -> bool:
  # gpu.sh has tried to import it (a broken install is caught there, not only a missing one).
  if os.environ.get("GPU_BENCH_DIFFUSERS") == "missing":
    return False
  return importlib.util.find_spec("diffusers") is not None


def run_part(part: str, timeout: float, sz: Sizes, out: str, log) -> tuple[str, float]:
  """Runs one part in a fresh process (own session, so a timeout kills its whole group);
  streams its output to stdout and the log. -> (status, seconds)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
  if sz.reduced or part.startswith("torch"):
    env["JAX_PLATFORMS"] = "cpu"   # the torch process imports jax code; keep it off the GPU
  if sz.reduced and part.startswith("jax"):
    # LLVM optimisation is most of a tiny model's compile on CPU; the reduced run checks the
    # code path, not CPU speed.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--out", out]
  cmd += ["--reduced"] if sz.reduced else []
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=ROOT, start_new_session=True)

  def pump():
    for line in proc.stdout:
      sys.stdout.write(line)
      sys.stdout.flush()
      log.write(line)
      log.flush()

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  try:
    rc = proc.wait(timeout=timeout)
    status = "ok" if rc == 0 else f"failed (exit {rc})"
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)   # our own child's process group
    proc.wait()
    status = f"timeout after {timeout:.0f} s"
  reader.join(5)
  return status, time.perf_counter() - t0


def load_results(out: str) -> dict:
  """{part: {name: record}} from results.jsonl (the last record of a name wins)."""
  res: dict = {}
  path = os.path.join(out, "results.jsonl")
  if os.path.exists(path):
    for line in open(path):
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:   # a line cut by a kill
        continue
      res.setdefault(rec["part"], {})[rec["name"]] = rec
  return res


def make_rows(res: dict, sz: Sizes, cmd: str) -> list[str]:
  """Markdown rows for bench/RESULTS.md; speed-up = diffusers seconds / adiff-jax seconds."""
  val = lambda part, name: (res.get(part, {}).get(name) or {}).get("value")
  fmt = lambda x, spec, unit="": "n/a" if x is None else format(x, spec) + unit
  jenv = val("jax_sample", "env") or val("jax_train", "env") or {}
  tenv = val("torch_sample", "env") or val("torch_train", "env") or {}
  device = jenv.get("device") or tenv.get("device") or "?"
  on_gpu = tenv.get("device", "cpu") != "cpu"
  groups = {  # kind -> (JAX part, torch part, shape, dtypes)
      "sample": ("jax_sample", "torch_sample",
                 f"{sz.batch}x{sz.frames}x{sz.size}x{sz.size}, {sz.steps} DDIM steps, CFG 7.5",
                 f"{sz.dtype} / {'fp16' if on_gpu else 'f32'} SDPA"),
      "train": ("jax_train", "torch_train",
                f"{sz.batch}x{sz.train_frames}x{sz.train_size}x{sz.train_size}, motion modules",
                f"{sz.dtype} / {'bf16 autocast' if on_gpu else 'f32'}")}
  table = [  # (measurement, group, result name, MFU name, number format)
      ("sampling end to end, s", "sample", "e2e_s", "mfu_e2e_pct", ".3f"),
      ("denoise, s/step", "sample", "denoise_s_per_step", "mfu_denoise_pct", ".4f"),
      ("VAE decode, s", "sample", "vae_decode_s", "mfu_vae_pct", ".3f"),
      ("first call - steady (compile), s", "sample", "compile_s", None, ".1f"),
      ("train step, s", "train", "step_s", "mfu_pct", ".4f"),
      ("train compile, s", "train", "compile_s", None, ".1f")]
  rows = []
  for what, group, name, mfu, spec in table:
    jp, tp, shape, dtypes = groups[group]
    j, t = val(jp, name), val(tp, name)
    if j is None and t is None:
      continue   # neither side measured it (skipped / timed out)
    ratio = f"{t / j:.2f}x" if j and t and name != "compile_s" else "n/a"
    mj, mt = (val(jp, mfu), val(tp, mfu)) if mfu else (None, None)
    cells = [time.strftime("%Y-%m-%d"), device, what, shape, dtypes, fmt(j, spec), fmt(t, spec), ratio,
             fmt(mj, ".1f", "%"), fmt(mt, ".1f", "%"), fmt(val(jp, "peak_mem_gib"), ".2f"),
             fmt(val(tp, "peak_mem_gib"), ".2f"), f"`{cmd}`"]
    rows.append("| " + " | ".join(cells) + " |")
  return rows


ATTN_SECTION = "GPU attention routing (bench/gpu.sh, part jax_attention)"
ATTN_HEADER = ("Each attention shape of the sampled video, cuDNN fused attention vs XLA "
               "(`attention_impl`), median ms of 5 after a warm-up; n/a: that path refused the "
               "shape (results.jsonl has the error).\n\n"
               "| date | device | attention | B, Lq, Lk, heads, head dim | dtype | cuDNN fwd ms | XLA fwd ms "
               "| cuDNN fwd+bwd ms | XLA fwd+bwd ms | faster (fwd / fwd+bwd) | command |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|")


def attention_rows(res: dict, sz: Sizes, cmd: str) -> list[str]:
  recs = res.get("jax_attention", {})
  device = ((recs.get("env") or {}).get("value") or {}).get("device", "?")
  rows = []
  for name, rec in recs.items():
    if not name.startswith("attn ") or not name.endswith(" cudnn"):
      continue
    kind = name[len("attn "):-len(" cudnn")]
    c = rec["value"]
    x = (recs.get(f"attn {kind} xla") or {}).get("value") or {}
    fmt = lambda t: "n/a" if t is None else f"{t:.3f}"
    faster = " / ".join(
        "n/a" if c.get(w) is None or x.get(w) is None else ("cuDNN" if c[w] < x[w] else "XLA")
        for w in ("fwd", "fwd_bwd"))
    cells = [time.strftime("%Y-%m-%d"), device, kind, ", ".join(map(str, rec.get("shape", []))), sz.dtype,
             fmt(c.get("fwd")), fmt(x.get("fwd")), fmt(c.get("fwd_bwd")), fmt(x.get("fwd_bwd")), faster,
             f"`{cmd}`"]
    rows.append("| " + " | ".join(cells) + " |")
  return rows


def append_rows(rows_file: str, results: str) -> None:
  from bench.results import add_row
  rows = [line for line in open(rows_file) if line.startswith("| 2")]   # data rows (dated)
  for row in rows:
    # The attention table's rows have 11 cells, the side-by-side table's 13.
    attn = row.count(" | ") == 10
    add_row(results, ATTN_SECTION if attn else SECTION, ATTN_HEADER if attn else HEADER, row)
  print(f"added {len(rows)} rows to {results} under '## {SECTION}' / '## {ATTN_SECTION}'")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--reduced", action="store_true", help="tiny model on CPU, f32 (the test's run)")
  ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "gpu_out"))
  ap.add_argument("--budget", type=float, default=None, help="total seconds (default 480; reduced 300)")
  ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
  ap.add_argument("--command", default=None, help="the command shown in the rows")
  ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)   # internal: run one part here
  ap.add_argument("--append-rows", metavar="ROWS_MD", help="add a run's rows.md to --results and exit")
  ap.add_argument("--results", default=os.path.join(ROOT, "bench", "RESULTS.md"))
  args = ap.parse_args()
  sz = REDUCED if args.reduced else FULL
  if args.append_rows:
    return append_rows(args.append_rows, args.results)
  os.makedirs(args.out, exist_ok=True)
  if args.part:
    return run_child(args.part, sz, args.out)

  budget = args.budget or (300.0 if sz.reduced else 480.0)
  parts = [p for p in PARTS if p in args.parts.split(",")]
  cmd = args.command or "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + sys.argv[1:])
  diffusers_ok = have_diffusers()
  if not diffusers_ok:
    print("WARNING: diffusers is not installed: running the JAX half only. Bring its wheel in .whl/ "
          "(see bench/gpu.sh).", flush=True)
  status_path = os.path.join(args.out, "results.jsonl")
  open(status_path, "w").close()   # a reused folder (bench/gpu_out) must not mix in old runs
  start = time.perf_counter()
  with open(os.path.join(args.out, "gpu_bench.log"), "w") as log:
    for i, part in enumerate(parts):
      later = sum(SHARE[p] for p in parts[i + 1:]) * budget   # reserved for the parts after this one
      timeout = budget - (time.perf_counter() - start) - later
      if part.startswith("torch") and not diffusers_ok:
        status, secs = "skipped: diffusers not installed", 0.0
      elif timeout < (5 if sz.reduced else 20):
        status, secs = "skipped: no budget left", 0.0
      else:
        print(f"=== {part}: timeout {timeout:.0f} s", flush=True)
        status, secs = run_part(part, timeout, sz, args.out, log)
      Emitter(status_path, part)("status", status, seconds=round(secs, 1))
  res = load_results(args.out)
  rows = make_rows(res, sz, cmd)
  attn_rows = attention_rows(res, sz, cmd)
  with open(os.path.join(args.out, "rows.md"), "w") as fh:
    fh.write(f"## {SECTION}\n\n{HEADER}\n" + "\n".join(rows) + "\n")
    if attn_rows:
      fh.write(f"\n## {ATTN_SECTION}\n\n{ATTN_HEADER}\n" + "\n".join(attn_rows) + "\n")
  print(f"\nrows for bench/RESULTS.md (also in {os.path.join(args.out, 'rows.md')}; "
        f"add them with: python bench/gpu_bench.py --append-rows {os.path.join(args.out, 'rows.md')}):")
  print(HEADER.split("\n\n")[1])
  print("\n".join(rows))
  if attn_rows:
    print("\n" + ATTN_HEADER.split("\n\n")[1])
    print("\n".join(attn_rows))
  print(f"total {time.perf_counter() - start:.0f} s; " +
        ", ".join(f"{p}: {res.get(p, {}).get('status', {}).get('value')}" for p in parts))


if __name__ == "__main__":
  main()
