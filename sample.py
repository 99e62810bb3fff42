"""Text-to-video sampling with AnimateDiff in JAX.

  python sample.py                                   # built-in tiny model, no download
  python sample.py --motion-lora builtin:left        # ... steered by a built-in MotionLoRA
  python sample.py --ckpt converted_dir --prompt "a cat walking, best quality"
  python sample.py --ckpt model.safetensors --motion-module mm_sd_v15_v2.ckpt --prompt "..."
  python sample.py --config configs/prompts/example.yaml   # official prompt-config format

--ckpt is an Orbax directory made by `python -m convert_weights to-orbax`, or PyTorch files
(LDM single file / diffusers folder), converted on the fly and cached (a message says where).
Writes one GIF and one MP4 per sample, a grid GIF of all samples and the resolved config (YAML).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import sys
import time
import warnings
from typing import Any, Optional

from adiff_jax.errors import InputError, run_cli


# Official prompt-config keys we understand; controlnet (SparseCtrl) ones are refused.
CONFIG_KEYS = {"dreambooth_path", "lora_model_path", "lora_alpha", "inference_config",
               "motion_module", "motion_module_lora_configs", "adapter_lora_path",
               "adapter_lora_scale", "seed", "steps", "guidance_scale", "prompt", "n_prompt",
               "W", "H", "L", "scheduler", "fps"} | {
               # long videos (ours; the official configs have none; same names as the flags)
               "context_length", "context_overlap", "context_stride", "context_schedule",
               "closed_loop", "fuse", "prompt_interpolation", "free_init", "free_init_method",
               "free_init_fast", "free_init_ds", "free_init_dt", "free_init_order", "free_noise",
               "free_noise_length", "free_noise_stride"}
UNSUPPORTED_PREFIX = "controlnet"
DEFAULT_NEGATIVE = ""


def _path_value(spec: str, default: float) -> tuple[str, float]:
  """'file.ckpt:0.8' -> ('file.ckpt', 0.8); a Windows-style or plain path keeps the default."""
  m = re.match(r"^(.*):([-+]?[0-9]*\.?[0-9]+)$", spec)
  return (m.group(1), float(m.group(2))) if m else (spec, default)


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--ckpt", help="model dir (python -m convert_weights to-orbax), LDM "
                  ".safetensors/.ckpt or diffusers folder; default `builtin`: the built-in tiny model "
                  "(trained when this build ships it; builtin:random for random weights)")
  ap.add_argument("--motion-module", help="motion module file (.ckpt/.safetensors/diffusers) if "
                  "--ckpt does not contain one")
  ap.add_argument("--prompt", action="append", help="prompt (repeatable)")
  ap.add_argument("--negative-prompt", default=None, help="negative prompt for every sample")
  ap.add_argument("--frames", type=int, default=16)
  ap.add_argument("--height", type=int, default=None, help="default 512 (64 for the built-in model)")
  ap.add_argument("--width", type=int, default=None, help="default 512 (64 for the built-in model)")
  ap.add_argument("--steps", type=int, default=None,
                  help="denoising steps (default 25, the official setting; 20 for the built-in model)")
  ap.add_argument("--guidance-scale", type=float, default=7.5)
  ap.add_argument("--seed", type=int, nargs="+", default=[-1], help="one or one per sample; -1 = random")
  ap.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
  from adiff_jax.schedulers import SAMPLERS, TIMESTEP_SPACINGS
  ap.add_argument("--scheduler", default="ddim", choices=SAMPLERS,
                  help="lcm: AnimateLCM (--steps 4 --guidance-scale 1.5 --lcm-original-steps 100); "
                  "euler with --timestep-spacing trailing: AnimateDiff-Lightning (--guidance-scale 1)")
  ap.add_argument("--timestep-spacing", default=None, choices=TIMESTEP_SPACINGS,
                  help="override the schedule's spacing (default: the inference config's, leading)")
  ap.add_argument("--lcm-original-steps", type=int, default=None, metavar="N",
                  help="LCM's original_inference_steps (default: the inference config's, else 50 as "
                  "diffusers; AnimateLCM uses 100)")
  ap.add_argument("--motion-lora", action="append", default=[], metavar="PATH[:ALPHA]",
                  help="MotionLoRA file or model dir (repeatable); builtin:left|right|up|down for the "
                  "built-in model's")
  ap.add_argument("--domain-adapter", metavar="PATH[:SCALE]")
  ap.add_argument("--lora", action="append", default=[], metavar="PATH[:ALPHA]",
                  help="kohya/A1111 LoRA merged into the UNet and text encoder (default alpha 0.8)")
  ap.add_argument("--clip-skip", type=int, default=1)
  lv = ap.add_argument_group(
      "long videos", "frames beyond the motion module's window (docs/long_videos.md). A prompt with "
      "keyframe lines travels: --prompt $'0: a red circle\n32: a blue square' (or '0: ... | 32: ...')")
  lv.add_argument("--context-length", type=int, default=None, metavar="L",
                  help="context windows of L frames (off by default; 16 for the v2/v3 motion modules)")
  lv.add_argument("--context-overlap", type=int, default=4, help="frames shared by neighbouring windows")
  lv.add_argument("--context-stride", type=int, default=1,
                  help="dilation levels 1, 2, 4, ... 2**(stride-1) (uniform/looped)")
  lv.add_argument("--context-schedule", default="uniform", choices=["uniform", "static", "looped"])
  lv.add_argument("--closed-loop", action="store_true", help="looped schedule: the last frame leads into the first")
  lv.add_argument("--fuse", default="pyramid", choices=["pyramid", "flat"], help="how window outputs are averaged")
  lv.add_argument("--context-batch", type=int, default=None, metavar="W",
                  help="windows per UNet call (default: one per data-axis device; more is faster, uses more memory)")
  lv.add_argument("--prompt-interpolation", default="lerp", choices=["lerp", "slerp"],
                  help="between prompt keyframes")
  lv.add_argument("--free-noise", action="store_true",
                  help="FreeNoise: rescheduled noise + motion-module windows (--free-noise-length/-stride)")
  lv.add_argument("--free-noise-length", type=int, default=16, metavar="L", help="FreeNoise window (default 16)")
  lv.add_argument("--free-noise-stride", type=int, default=4, metavar="S", help="FreeNoise window stride (default 4)")
  lv.add_argument("--free-init", type=int, default=0, metavar="N",
                  help="FreeInit with N iterations (diffusers default 3; 0 = off)")
  lv.add_argument("--free-init-method", default="butterworth", choices=["butterworth", "gaussian", "ideal"])
  lv.add_argument("--free-init-ds", type=float, default=0.25, metavar="D",
                  help="FreeInit spatial stop frequency d_s (default 0.25)")
  lv.add_argument("--free-init-dt", type=float, default=0.25, metavar="D",
                  help="FreeInit temporal stop frequency d_t (default 0.25)")
  lv.add_argument("--free-init-order", type=int, default=4, help="FreeInit Butterworth order (default 4)")
  lv.add_argument("--free-init-fast", action="store_true",
                  help="coarse-to-fine: iteration i runs steps * (i + 1) / N steps")
  ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"],
                  help="compute dtype of the text encoder, UNet and VAE (bf16 on GPU/TPU)")
  ap.add_argument("--attention-impl", default=None, choices=["xla", "cudnn"],
                  help="attention kernel (default: cuDNN fused attention where it applies on GPU, XLA elsewhere)")
  ap.add_argument("--out", default="outputs", help="output folder (a timestamped subfolder is made)")
  ap.add_argument("--fps", type=int, default=8)
  ap.add_argument("--config", help="official AnimateDiff prompt-config YAML")
  ap.add_argument("--mesh-frames", type=int, default=1, help="devices along the frames axis")
  ap.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "adiff_jax"),
                  help="where PyTorch files converted on the fly are cached")
  ap.add_argument("--compile-cache", default=None, metavar="DIR",
                  help="persistent XLA compilation cache (default ~/.cache/adiff_jax/xla): a second "
                       "run with the same shapes compiles nothing")
  ap.add_argument("--no-compile-cache", action="store_true", help="do not use the compilation cache")
  return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Models


def _cache_key(*parts) -> str:
  h = hashlib.sha256()
  for p in parts:
    if isinstance(p, str) and os.path.exists(p):
      st = os.stat(p)
      p = f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}"
    h.update(json.dumps(p, default=str).encode())
  return h.hexdigest()[:16]


def _as_model_dir(cache_dir: str, **kw) -> str:
  """PyTorch files -> a cached model dir (converted once; later runs reuse it). A path that
  already is a model dir is used as it is."""
  from adiff_jax import model_dir
  given = [v for v in kw.values() if v]
  if len(given) == 1 and isinstance(given[0], str) and model_dir.is_model_dir(given[0]):
    return given[0]
  from convert_weights.convert import to_orbax
  out = os.path.join(cache_dir, "converted", _cache_key(sorted(kw.items())))
  if model_dir.is_model_dir(out):
    print(f"using cached conversion {out}")
  else:
    print(f"converting PyTorch weights to Orbax once; cached at {out}")
    to_orbax(out, **kw)
  return out


def load_model(args) -> tuple[Any, dict, Optional[dict], str]:
  """(ModelConfig, params {unet, text_encoder, vae}, combined LoRA tree or None, description).
  PyTorch files are converted (and cached) first; `adiff_jax.model_dir.load` reads the rest."""
  from adiff_jax import builtin, model_dir

  mloras = [_path_value(s, 1.0) for s in args.motion_lora]
  adapter = _path_value(args.domain_adapter, 1.0) if args.domain_adapter else None
  loras = [_path_value(s, 0.8) for s in args.lora]
  if builtin.is_builtin(args.ckpt):
    if args.motion_module or adapter or loras:
      raise InputError("--motion-module/--domain-adapter/--lora need --ckpt (the built-in model "
                       "has its own motion module; --motion-lora builtin:left etc. steer it)")
    mloras = [(p if builtin.is_builtin(p) else _as_model_dir(args.cache_dir, motion_loras=[(p, 1.0)]), a)
              for p, a in mloras]
    return builtin.load(args.ckpt, mloras)
  ckpt = args.ckpt
  for p in [ckpt, args.motion_module] + [p for p, _ in loras + mloras] + ([adapter[0]] if adapter else []):
    if p and not os.path.exists(p):
      raise InputError(f"file not found: {p}")
  if loras and model_dir.is_model_dir(ckpt):
    raise InputError("--lora (kohya) is merged at conversion time: give the PyTorch base model, or "
                     "convert with `python -m convert_weights to-orbax --lora ...`")
  if not model_dir.is_model_dir(ckpt):
    ckpt = _as_model_dir(args.cache_dir, base_path=ckpt, loras=loras)
  mm = _as_model_dir(args.cache_dir, motion_module=args.motion_module) if args.motion_module else None
  # LoRAs are converted at strength 1 (one cache entry per file); `load` applies the alphas.
  mloras = [(_as_model_dir(args.cache_dir, motion_loras=[(p, 1.0)]), a) for p, a in mloras]
  if adapter:
    adapter = (_as_model_dir(args.cache_dir, domain_adapter=(adapter[0], 1.0)), adapter[1])
  cfg, params, lora, meta = model_dir.load(ckpt, motion_module=mm, motion_loras=mloras,
                                           domain_adapter=adapter)
  if cfg.motion is None:
    raise InputError("no motion module: pass --motion-module or a --ckpt converted with one")
  mm_meta = model_dir.read_metadata(mm) if mm else meta
  desc = f"{args.ckpt} + motion module {mm_meta.get('versions', {}).get('motion_module', '?')}"
  return cfg, params, lora, desc


# ---------------------------------------------------------------------------------------------
# Prompt configs (official YAML format)


def read_prompt_config(path: str) -> list[dict]:
  import yaml
  if not os.path.isfile(path):
    raise InputError(f"config file not found: {path}")
  try:
    with open(path) as f:
      data = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise InputError(f"cannot read YAML {path}: {e}")
  entries = data if isinstance(data, list) else list(data.values()) if isinstance(data, dict) else None
  if not entries or not all(isinstance(e, dict) for e in entries):
    raise InputError(f"{path}: expected a list of entries (or a mapping of named entries)")
  for i, e in enumerate(entries):
    bad = [k for k in e if k.startswith(UNSUPPORTED_PREFIX)]
    if bad:
      raise InputError(f"{path} entry {i}: {', '.join(bad)}: SparseCtrl/ControlNet is not "
                       "supported yet")
    unknown = sorted(set(e) - CONFIG_KEYS)
    if unknown:
      warnings.warn(f"{path} entry {i}: ignoring unknown keys {unknown}")
  return entries


def entry_to_args(entry: dict, base: argparse.Namespace) -> argparse.Namespace:
  a = argparse.Namespace(**vars(base))
  a.ckpt = entry.get("dreambooth_path") or base.ckpt
  mm = entry.get("motion_module")
  a.motion_module = (mm[0] if isinstance(mm, list) else mm) or base.motion_module
  if entry.get("lora_model_path"):
    a.lora = [f"{entry['lora_model_path']}:{entry.get('lora_alpha', 0.8)}"]
  a.motion_lora = [f"{c['path']}:{c.get('alpha', 1.0)}" for c in entry.get("motion_module_lora_configs") or []]
  if entry.get("adapter_lora_path"):
    a.domain_adapter = f"{entry['adapter_lora_path']}:{entry.get('adapter_lora_scale', 1.0)}"
  prompts = entry.get("prompt") or base.prompt or [""]
  # A single string or {frame: text} mapping is one prompt; a list holds one per sample.
  a.prompt = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
  n = entry.get("n_prompt", [base.negative_prompt or DEFAULT_NEGATIVE])
  n = [n] if isinstance(n, (str, dict)) else list(n)
  a.negative = n * len(a.prompt) if len(n) == 1 else n
  seed = entry.get("seed", base.seed)
  a.seed = [seed] if isinstance(seed, int) else list(seed)
  a.steps = entry.get("steps", base.steps)
  a.guidance_scale = entry.get("guidance_scale", base.guidance_scale)
  a.width = entry.get("W", base.width)
  a.height = entry.get("H", base.height)
  a.frames = entry.get("L", base.frames)
  a.scheduler = entry.get("scheduler", base.scheduler)
  a.inference_config = entry.get("inference_config")
  for key in ("context_length", "context_overlap", "context_stride", "context_schedule",
              "closed_loop", "fuse", "prompt_interpolation", "free_init", "free_init_method",
              "free_init_fast", "free_init_ds", "free_init_dt", "free_init_order", "free_noise",
              "free_noise_length", "free_noise_stride"):
    if key in entry:
      setattr(a, key, entry[key])
  return a


def schedule_from_inference_config(path: Optional[str]):
  """noise_scheduler_kwargs of an official inference config (missing file: the official defaults)."""
  from adiff_jax.schedulers import NoiseSchedule
  sched = NoiseSchedule.animatediff()
  if not path:
    return sched
  if not os.path.isfile(path):
    warnings.warn(f"inference_config {path} not found: using the official DDIM defaults")
    return sched
  import yaml
  with open(path) as f:
    kw = (yaml.safe_load(f) or {}).get("noise_scheduler_kwargs", {})
  fields = {f.name for f in dataclasses.fields(NoiseSchedule)}
  return dataclasses.replace(sched, **{k: v for k, v in kw.items() if k in fields})


def cli_schedule(args: argparse.Namespace):
  """The inference config's schedule with --timestep-spacing / --lcm-original-steps applied;
  the sampler is built once so bad combinations fail before any model is loaded."""
  from adiff_jax.schedulers import make_sampler
  sched = schedule_from_inference_config(getattr(args, "inference_config", None))
  kw = {}
  if getattr(args, "timestep_spacing", None):
    kw["timestep_spacing"] = args.timestep_spacing
  if getattr(args, "lcm_original_steps", None) is not None:
    kw["original_inference_steps"] = args.lcm_original_steps
  sched = dataclasses.replace(sched, **kw)
  make_sampler(args.scheduler, sched, args.steps)
  return sched


# ---------------------------------------------------------------------------------------------


def long_video_options(args: argparse.Namespace) -> dict:
  """SamplingConfig fields of the long-video flags (bad values fail here, before any loading)."""
  from adiff_jax.context import ContextConfig
  from adiff_jax.free_init import FreeInitConfig
  out = dict(prompt_interpolation=args.prompt_interpolation, context_batch=args.context_batch)
  if args.context_length is not None:
    out["context"] = ContextConfig(context_length=args.context_length, overlap=args.context_overlap,
                                   stride=args.context_stride, schedule=args.context_schedule,
                                   closed_loop=args.closed_loop, fuse=args.fuse)
  elif args.closed_loop or args.context_schedule != "uniform":
    raise InputError("--context-schedule/--closed-loop need --context-length (context windows)")
  if args.free_noise:
    from adiff_jax.free_noise import FreeNoiseConfig
    out["free_noise"] = FreeNoiseConfig(context_length=args.free_noise_length,
                                        context_stride=args.free_noise_stride)
  if args.free_init < 0:
    raise InputError(f"--free-init takes a number of iterations >= 0, got {args.free_init}")
  if args.free_init:
    out["free_init"] = FreeInitConfig(iterations=args.free_init, method=args.free_init_method,
                                      order=args.free_init_order, spatial_stop_frequency=args.free_init_ds,
                                      temporal_stop_frequency=args.free_init_dt,
                                      fast_sampling=args.free_init_fast)
  return out


def run(args: argparse.Namespace, out_dir: str) -> list[str]:
  import jax
  from adiff_jax import prompt_travel
  from adiff_jax.sampling import Pipeline, SamplingConfig
  from adiff_jax.sharding import make_mesh
  from adiff_jax.video_io import grid, save_gif, save_mp4, to_uint8

  from adiff_jax import builtin as builtin_lib
  if args.steps is None:   # the built-in model is sampled at 20 steps: well under a minute on 2 cores
    args.steps = 20 if builtin_lib.is_builtin(args.ckpt) else 25
  schedule = cli_schedule(args)
  long_video = long_video_options(args)
  travel = [prompt_travel.as_prompt(p) for p in (args.prompt or [])]
  neg_travel = [prompt_travel.as_prompt(p) for p in
                (getattr(args, "negative", None) or [args.negative_prompt or DEFAULT_NEGATIVE])]
  for p in travel:
    prompt_travel.check(p, args.frames)
  for p in neg_travel:
    prompt_travel.check(p, args.frames, "negative prompt")
  cfg, params, lora, desc = load_model(args)
  builtin = builtin_lib.is_builtin(args.ckpt)
  h = args.height or (64 if builtin else 512)
  w = args.width or (64 if builtin else 512)
  prompts = travel or list(builtin_lib.DEFAULT_PROMPTS if builtin else [""])
  negative = neg_travel * len(prompts) if len(neg_travel) == 1 else neg_travel
  n = args.num_samples
  prompts = [p for p in prompts for _ in range(n)]
  negative = [q for q in negative for _ in range(n)]
  seeds = list(args.seed)
  if len(seeds) == 1:
    seeds = seeds * len(prompts) if seeds[0] != -1 else [-1] * len(prompts)
  if len(seeds) != len(prompts):
    raise InputError(f"{len(seeds)} seeds for {len(prompts)} samples")
  seeds = [s if s != -1 else random.randrange(2**31) for s in seeds]
  sc = SamplingConfig(frames=args.frames, height=h, width=w, steps=args.steps,
                      guidance_scale=args.guidance_scale, scheduler=args.scheduler,
                      clip_skip=args.clip_skip,
                      schedule=schedule, **long_video)
  mesh = None
  if len(jax.devices()) > 1:
    mesh = make_mesh(frames=args.mesh_frames)
  pipe = Pipeline(cfg, params, lora=lora, dtype=args.dtype, mesh=mesh, attention_impl=args.attention_impl)
  pipe.check(sc)
  print(f"model: {desc}")
  print(f"sampling {len(prompts)} video(s): {sc.frames} frames {h}x{w}, {sc.steps} {sc.scheduler} "
        f"steps, guidance {sc.guidance_scale}, dtype {args.dtype}, seeds {seeds}")
  if sc.context is not None and sc.frames > sc.context.context_length:
    c = sc.context
    print(f"context windows: {c.context_length} frames, overlap {c.overlap}, {c.schedule} schedule"
          f"{' (closed loop)' if c.closed_loop else ''}, {c.fuse} fusion, "
          f"{pipe.context_batch(sc)} window(s) per UNet call")
  if sc.free_noise is not None:
    print(f"FreeNoise: windows of {sc.free_noise.context_length} frames, stride "
          f"{sc.free_noise.context_stride}, rescheduled noise")
  if sc.free_init is not None:
    print(f"FreeInit: {sc.free_init.iterations} iterations, {sc.free_init.method} filter"
          f"{', fast sampling' if sc.free_init.fast_sampling else ''}")
  for p in prompts:
    if not isinstance(p, str):
      print(f"prompt travel ({sc.prompt_interpolation}): {prompt_travel.describe(p)}")
  t0 = time.perf_counter()
  try:
    frames = to_uint8(pipe(prompts, negative, seeds, sc))
  except FloatingPointError as e:
    raise InputError(str(e)) from None
  print(f"done in {time.perf_counter() - t0:.1f} s (including compilation)")

  os.makedirs(os.path.join(out_dir, "sample"), exist_ok=True)
  written = []
  for i, (p, s, v) in enumerate(zip(prompts, seeds, frames)):
    stem = os.path.join(out_dir, "sample", f"{i}-{_slug(prompt_travel.describe(p))}-seed{s}")
    written += [save_gif(v, stem + ".gif", args.fps), save_mp4(v, stem + ".mp4", args.fps)]
  written.append(save_gif(grid(list(frames)), os.path.join(out_dir, "sample.gif"), args.fps))
  resolved = dict(ckpt=args.ckpt or "builtin", motion_module=args.motion_module,
                  motion_lora=args.motion_lora, domain_adapter=args.domain_adapter, lora=args.lora,
                  prompt=prompts, n_prompt=negative, seed=seeds, steps=sc.steps,
                  guidance_scale=sc.guidance_scale, scheduler=sc.scheduler, W=w, H=h, L=sc.frames,
                  dtype=args.dtype, fps=args.fps, clip_skip=sc.clip_skip,
                  **_long_video_resolved(args),
                  noise_scheduler_kwargs={k: v for k, v in dataclasses.asdict(sc.schedule).items()})
  import yaml
  cfg_path = os.path.join(out_dir, "config.yaml")
  with open(cfg_path, "w") as f:
    yaml.safe_dump(resolved, f, sort_keys=False)
  written.append(cfg_path)
  return written


def _long_video_resolved(args: argparse.Namespace) -> dict:
  """The long-video settings in prompt-config keys (only those in use)."""
  out = {}
  if args.context_length is not None:
    out.update(context_length=args.context_length, context_overlap=args.context_overlap,
               context_stride=args.context_stride, context_schedule=args.context_schedule,
               closed_loop=args.closed_loop, fuse=args.fuse)
  if args.free_init:
    out.update(free_init=args.free_init, free_init_method=args.free_init_method,
               free_init_ds=args.free_init_ds, free_init_dt=args.free_init_dt,
               free_init_order=args.free_init_order, free_init_fast=args.free_init_fast)
  if args.free_noise:
    out.update(free_noise=True, free_noise_length=args.free_noise_length,
               free_noise_stride=args.free_noise_stride)
  if args.prompt_interpolation != "lerp":
    out["prompt_interpolation"] = args.prompt_interpolation
  return out


def _slug(text: str, n: int = 40) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:n] or "empty"


def main(argv=None) -> int:
  args = parse_args(argv)
  stats = None
  if not args.no_compile_cache:
    from adiff_jax import compile_cache
    where = compile_cache.enable(args.compile_cache or compile_cache.default_dir())
    print(f"XLA compilation cache: {where} (--no-compile-cache turns it off)")
    stats = compile_cache.CacheStats()
  out_dir = os.path.join(args.out, time.strftime("sample-%Y%m%d-%H%M%S"))
  runs = [args]
  if args.config:
    runs = [entry_to_args(e, args) for e in read_prompt_config(args.config)]
  written = []
  for i, a in enumerate(runs):
    written += run(a, out_dir if len(runs) == 1 else os.path.join(out_dir, str(i)))
  print("wrote:\n  " + "\n  ".join(written))
  if stats is not None:
    print(f"compilation: {stats}")
  return 0


if __name__ == "__main__":
  sys.exit(run_cli(main))
