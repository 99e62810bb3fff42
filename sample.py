"""Text-to-video sampling with AnimateDiff in JAX.

  python sample.py                                   # built-in tiny model, no download
  python sample.py --motion-lora builtin:left        # ... steered by a built-in MotionLoRA
  python sample.py --ckpt converted_dir --prompt "a cat walking, best quality"
  python sample.py --ckpt model.safetensors --motion-module mm_sd_v15_v2.ckpt --prompt "..."
  python sample.py --config configs/prompts/example.yaml   # official prompt-config format
  python sample.py --ckpt ... --motion-module v3_sd15_mm.ckpt --sparsectrl v3_sd15_sparsectrl_rgb.ckpt \
      --cond-image first.png:0 --cond-image last.png:-1 --prompt "..."   # SparseCtrl keyframes
  python sample.py --ckpt ... --init-video input.mp4 --strength 0.6 --prompt "..."  # video-to-video
  python sample.py --ckpt ... --controlnet control_v11f1p_sd15_depth.pth:0.8 --control-video depth.mp4 \
      --prompt "..."                                   # dense ControlNet (repeat both for several)

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


# Prompt-config keys we understand: the official ones (controlnet_*: SparseCtrl) and ours.
CONFIG_KEYS = {"dreambooth_path", "lora_model_path", "lora_alpha", "inference_config",
               "motion_module", "motion_module_lora_configs", "adapter_lora_path",
               "adapter_lora_scale", "seed", "steps", "guidance_scale", "prompt", "n_prompt",
               "W", "H", "L", "scheduler", "fps"} | {
               # long videos (ours; the official configs have none; same names as the flags)
               "context_length", "context_overlap", "context_stride", "context_schedule",
               "closed_loop", "fuse", "prompt_interpolation", "free_init", "free_init_method",
               "free_init_fast", "free_init_ds", "free_init_dt", "free_init_order", "free_noise",
               "free_noise_length", "free_noise_stride"} | {
               # SparseCtrl (official; controlnet_conditioning_scale is read by the official pipeline
               # call but not by its script: ours reads it from the YAML too)
               "controlnet_path", "controlnet_config", "controlnet_images", "controlnet_image_indexs",
               "controlnet_conditioning_scale", "normalize_condition_images"} | {
               # video-to-video (ours, the flags' names)
               "init_video", "strength",
               # dense ControlNets (ours): a list of {path, video, scale, start, end}; guess_mode
               "controlnets", "guess_mode"}
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
  ap.add_argument("--height", type=int, default=None,
                  help="default 512 (SDXL 1024, the built-in model 64)")
  ap.add_argument("--width", type=int, default=None,
                  help="default 512 (SDXL 1024, the built-in model 64)")
  ap.add_argument("--steps", type=int, default=None,
                  help="denoising steps (default 25, the official setting; SDXL 100 as the official "
                  "sdxl prompt configs; 20 for the built-in model)")
  ap.add_argument("--guidance-scale", type=float, default=None,
                  help="default 7.5 (SDXL 8.5, the official sdxl prompt configs)")
  ap.add_argument("--seed", type=int, nargs="+", default=[-1], help="one or one per sample; -1 = random")
  ap.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
  from adiff_jax.schedulers import SAMPLERS, TIMESTEP_SPACINGS
  ap.add_argument("--scheduler", default=None, choices=SAMPLERS,
                  help="default ddim with the official AnimateDiff settings (SDXL: euler with the "
                  "official sdxl-branch betas); lcm: AnimateLCM (--steps 4 --guidance-scale 1.5 --lcm-original-steps 100); "
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
  sp = ap.add_argument_group("SparseCtrl", "keyframe conditioning (docs/control.md)")
  sp.add_argument("--sparsectrl", metavar="PATH", help="SparseCtrl file (v3_sd15_sparsectrl_rgb.ckpt or "
                  "_scribble.ckpt, official or diffusers format; converted on load)")
  sp.add_argument("--cond-image", action="append", default=[], metavar="FILE[:INDEX]",
                  help="keyframe image and its frame index (repeatable; negative counts from the end; "
                  "without INDEX the k-th --cond-image goes to frame k). Centre-cropped to the video's "
                  "aspect and resized, as the official script")
  sp.add_argument("--controlnet-scale", type=float, default=1.0, metavar="S",
                  help="SparseCtrl conditioning scale (default 1.0)")
  cn = ap.add_argument_group("ControlNet", "dense control, one control frame per video frame "
                             "(docs/control.md); repeat the flags for several ControlNets")
  cn.add_argument("--controlnet", action="append", default=[], metavar="PATH[:SCALE]",
                  help="SD1.5 ControlNet (lllyasviel .pth/.safetensors, diffusers folder), scale "
                  "default 1.0")
  cn.add_argument("--control-video", action="append", default=[], metavar="FILE|DIR",
                  help="control frames of the k-th --controlnet (already preprocessed: depth, "
                  "edges, pose...): a GIF/MP4 or a folder of images; its first --frames frames, resized")
  cn.add_argument("--control-images", action="append", dest="control_video", metavar="DIR",
                  help="the same as --control-video, a folder of images")
  cn.add_argument("--control-range", action="append", default=[], metavar="START:END",
                  help="share of the steps the k-th ControlNet acts on (default 0:1; "
                  "diffusers' control_guidance_start/end)")
  cn.add_argument("--guess-mode", action="store_true",
                  help="ControlNets see the conditional half only (diffusers' guess mode)")
  vv = ap.add_argument_group("video-to-video", "restyle an input video (docs/control.md)")
  vv.add_argument("--init-video", metavar="FILE", help="input video (GIF/MP4) or folder of frames: "
                  "VAE-encoded, noised to the strength's step; its first --frames frames, resized")
  vv.add_argument("--strength", type=float, default=0.8, metavar="S",
                  help="share of the steps that run from the noised input (0..1, default 0.8 as "
                  "diffusers): higher changes the video more")
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
  if entry.get("controlnets"):
    nets = entry["controlnets"]
    if not isinstance(nets, list) or not all(isinstance(n, dict) and "path" in n for n in nets):
      raise InputError("controlnets: expected a list of {path, video, scale, start, end} entries")
    a.controlnet = [f"{n['path']}:{n.get('scale', 1.0)}" for n in nets]
    a.control_video = [n.get("video") for n in nets]
    a.control_range = [f"{n.get('start', 0.0)}:{n.get('end', 1.0)}" for n in nets]
  for key in ("guess_mode", "init_video", "strength", "context_length", "context_overlap", "context_stride", "context_schedule",
              "closed_loop", "fuse", "prompt_interpolation", "free_init", "free_init_method",
              "free_init_fast", "free_init_ds", "free_init_dt", "free_init_order", "free_noise",
              "free_noise_length", "free_noise_stride"):
    if key in entry:
      setattr(a, key, entry[key])
  # SparseCtrl: the official keys (controlnet_image_indexs defaults to [0] as in the official script)
  if entry.get("controlnet_path") or entry.get("controlnet_images"):
    a.sparsectrl = entry.get("controlnet_path") or None
    images = entry.get("controlnet_images") or []
    a.cond_images = [images] if isinstance(images, str) else list(images)
    idx = entry.get("controlnet_image_indexs", [0])
    a.cond_indices = [idx] if isinstance(idx, int) else list(idx)
    a.controlnet_config = entry.get("controlnet_config")
    a.controlnet_scale = float(entry.get("controlnet_conditioning_scale", base.controlnet_scale))
    a.normalize_condition_images = bool(entry.get("normalize_condition_images", False))
  return a


def model_family(args: argparse.Namespace) -> str:
  """"sdxl" or "sd15" for --ckpt, known before anything loads where it is cheap to tell: a model
  dir's config, a diffusers folder's text_encoder_2/, a .safetensors file's keys. (A pickled
  SDXL .ckpt is recognised once loaded.)"""
  from adiff_jax import builtin, model_dir
  ckpt = args.ckpt
  if builtin.is_builtin(ckpt) or not ckpt or not os.path.exists(ckpt):
    return "sd15"
  if model_dir.is_model_dir(ckpt):
    return "sdxl" if "text_encoder_2" in model_dir.read_metadata(ckpt).get("configs", {}) else "sd15"
  if os.path.isdir(ckpt):
    return "sdxl" if os.path.isdir(os.path.join(ckpt, "text_encoder_2")) else "sd15"
  if ckpt.endswith(".safetensors"):
    from safetensors import safe_open
    from convert_weights.detect import detect_keys
    try:
      with safe_open(ckpt, "np") as f:
        return "sdxl" if detect_keys(list(f.keys())) == "sdxl" else "sd15"
    except Exception:   # a damaged file: the loader names the problem
      return "sd15"
  return "sd15"


def resolve_defaults(args: argparse.Namespace, family: str) -> None:
  """Fill in what the user left unset, per model: the built-in model (64x64, 20 steps), SD1.5
  (512, 25 DDIM steps, guidance 7.5: the official AnimateDiff settings) or SDXL (1024, 100 Euler
  steps, guidance 8.5: the official sdxl branch's configs)."""
  from adiff_jax import builtin
  if builtin.is_builtin(args.ckpt):
    size, steps, guidance, scheduler = 64, 20, 7.5, "ddim"
  elif family == "sdxl":
    size, steps, guidance, scheduler = 1024, 100, 8.5, "euler"
  else:
    size, steps, guidance, scheduler = 512, 25, 7.5, "ddim"
  if not hasattr(args, "defaulted"):   # what the user left unset (a later call may redo them)
    args.defaulted = [k for k in ("height", "width", "steps", "guidance_scale", "scheduler")
                      if getattr(args, k, None) is None]
  for k in args.defaulted:
    setattr(args, k, None)
  args.family = family
  args.height = args.height or size
  args.width = args.width or size
  args.steps = steps if args.steps is None else args.steps
  args.guidance_scale = guidance if args.guidance_scale is None else args.guidance_scale
  args.scheduler = args.scheduler or scheduler


def schedule_from_inference_config(path: Optional[str], family: str = "sd15"):
  """noise_scheduler_kwargs of an official inference config (missing file: the official defaults;
  SDXL: the official sdxl branch's)."""
  from adiff_jax.schedulers import NoiseSchedule
  sched = NoiseSchedule.animatediff_sdxl() if family == "sdxl" else NoiseSchedule.animatediff()
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
  sched = schedule_from_inference_config(getattr(args, "inference_config", None),
                                         getattr(args, "family", "sd15"))
  kw = {}
  if getattr(args, "timestep_spacing", None):
    kw["timestep_spacing"] = args.timestep_spacing
  if getattr(args, "lcm_original_steps", None) is not None:
    kw["original_inference_steps"] = args.lcm_original_steps
  sched = dataclasses.replace(sched, **kw)
  if args.steps is None or args.scheduler is None:
    resolve_defaults(args, getattr(args, "family", "sd15"))
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


def sparse_ctrl_request(args: argparse.Namespace) -> Optional[dict]:
  """The SparseCtrl inputs of the flags or prompt-config keys, checked before anything loads:
  {path, images, indices, scale, normalize, config} or None."""
  path = getattr(args, "sparsectrl", None)
  if getattr(args, "cond_indices", None) is not None:   # controlnet_images / controlnet_image_indexs
    images, indices = list(args.cond_images), list(args.cond_indices)
  else:                                                  # --cond-image FILE[:INDEX]
    images, indices = [], []
    for k, spec in enumerate(getattr(args, "cond_image", None) or []):
      m = re.match(r"^(.*):([-+]?[0-9]+)$", spec)
      images.append(m.group(1) if m else spec)
      indices.append(int(m.group(2)) if m else k)
  if not path:
    if images:
      raise InputError("--cond-image (controlnet_images) needs --sparsectrl (controlnet_path)")
    return None
  if not images:
    raise InputError("SparseCtrl needs keyframe images: --cond-image FILE[:INDEX] (controlnet_images)")
  if len(images) != len(indices):
    raise InputError(f"{len(images)} condition images but {len(indices)} frame indices "
                     f"(controlnet_image_indexs {indices}): give one index per image")
  if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
    raise InputError(f"keyframe indices must be integers, got {indices}")
  frames = args.frames
  bad = [i for i in indices if not -frames <= i < frames]
  if bad:
    raise InputError(f"keyframe indices {bad} outside a {frames}-frame video (valid: -{frames} .. {frames - 1})")
  if len({i % frames for i in indices}) != len(indices):
    raise InputError(f"keyframe indices {indices} name the same frame twice")
  for p in [path] + images:
    if not os.path.exists(p):
      raise InputError(f"file not found: {p}")
  return dict(path=path, images=images, indices=indices, scale=float(args.controlnet_scale),
              normalize=bool(getattr(args, "normalize_condition_images", False)),
              config=getattr(args, "controlnet_config", None))


def controlnet_request(args: argparse.Namespace) -> list[dict]:
  """The dense ControlNets of the flags or prompt config, checked before anything loads:
  [{path, scale, video, start, end}]."""
  nets = list(getattr(args, "controlnet", None) or [])
  videos = list(getattr(args, "control_video", None) or [])
  ranges = list(getattr(args, "control_range", None) or [])
  if len(videos) != len(nets):
    raise InputError(f"{len(nets)} --controlnet but {len(videos)} --control-video/--control-images: "
                     f"give one control video per ControlNet")
  if len(ranges) not in (0, len(nets)):
    raise InputError(f"{len(ranges)} --control-range for {len(nets)} ControlNets: give none or one each")
  out = []
  for k, (spec, video) in enumerate(zip(nets, videos)):
    path, scale = _path_value(spec, 1.0)
    rng = ranges[k] if ranges else "0:1"
    m = re.match(r"^\s*([0-9.]+)\s*:\s*([0-9.]+)\s*$", str(rng))
    if not m:
      raise InputError(f"--control-range {rng!r}: expected START:END, e.g. 0:0.6")
    start, end = float(m.group(1)), float(m.group(2))
    if not 0.0 <= start < end <= 1.0:
      raise InputError(f"--control-range {rng}: need 0 <= START < END <= 1")
    for p in (path, video):
      if not p or not os.path.exists(p):
        raise InputError(f"file not found: {p}")
    out.append(dict(path=path, scale=scale, video=video, start=start, end=end))
  return out


def load_sparse_ctrl_file(req: dict):
  """(SparseCtrlConfig, params) of a SparseCtrl file, converted in memory (renaming only: no
  cache); an official `controlnet_config` must agree with what the weights are."""
  from convert_weights.sparse_ctrl_files import load_sparse_ctrl
  tree, ctrl_cfg, _ = load_sparse_ctrl(req["path"])
  path = req.get("config")
  if path and not os.path.isfile(path):
    warnings.warn(f"controlnet_config {path} not found: the SparseCtrl settings come from the weights")
  elif path:
    import yaml
    with open(path) as f:
      kw = (yaml.safe_load(f) or {}).get("controlnet_additional_kwargs") or {}
    for key in ("use_simplified_condition_embedding", "conditioning_channels"):
      if key in kw and kw[key] != getattr(ctrl_cfg, key):
        raise InputError(f"controlnet_config {path}: {key}={kw[key]}, but {req['path']} is a "
                         f"{ctrl_cfg.kind} SparseCtrl ({key}={getattr(ctrl_cfg, key)})")
  return ctrl_cfg, tree


def load_keyframe_images(paths, height: int, width: int, normalize: bool = False):
  """Images -> (K, height, width, 3) float32 in [0, 1], as the official script prepares them:
  centre crop to the video's aspect, then bilinear resize (torchvision's RandomResizedCrop with
  scale (1, 1) and ratio W/H falls back to that centre crop). diffusers resizes without cropping;
  both agree when the aspect already matches. normalize (`normalize_condition_images`): grey,
  stretched to [0, 1]."""
  import numpy as np
  from PIL import Image
  out = []
  for p in paths:
    try:
      img = Image.open(p).convert("RGB")
    except (OSError, ValueError) as e:
      raise InputError(f"cannot read image {p}: {e}")
    w0, h0 = img.size
    if (w0, h0) != (width, height):
      if w0 * height > h0 * width:     # wider than the video: crop the sides
        cw, ch = int(round(h0 * width / height)), h0
      else:
        cw, ch = w0, int(round(w0 * height / width))
      left, top = (w0 - cw) // 2, (h0 - ch) // 2
      img = img.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BILINEAR)
      print(f"note: condition image {p} is {w0}x{h0}: centre-cropped to {cw}x{ch} and resized to "
            f"{width}x{height}")
    a = np.asarray(img, np.float32) / 255.0
    if normalize:
      g = np.repeat(a.mean(-1, keepdims=True), 3, -1)
      g = g - g.min()
      a = g / max(float(g.max()), 1e-8)
    out.append(a)
  return np.stack(out)


def run(args: argparse.Namespace, out_dir: str) -> list[str]:
  import jax
  from adiff_jax import prompt_travel
  from adiff_jax.control import ControlNetSampling
  from adiff_jax.sampling import Pipeline, SamplingConfig, SparseCtrlSampling, seed_key
  from adiff_jax.sharding import make_mesh
  from adiff_jax.video_io import grid, save_gif, save_mp4, to_uint8

  from adiff_jax import builtin as builtin_lib
  resolve_defaults(args, model_family(args))
  schedule = cli_schedule(args)
  long_video = long_video_options(args)
  travel = [prompt_travel.as_prompt(p) for p in (args.prompt or [])]
  neg_travel = [prompt_travel.as_prompt(p) for p in
                (getattr(args, "negative", None) or [args.negative_prompt or DEFAULT_NEGATIVE])]
  neg_given = bool(getattr(args, "negative", None)) or args.negative_prompt is not None
  for p in travel:
    prompt_travel.check(p, args.frames)
  for p in neg_travel:
    prompt_travel.check(p, args.frames, "negative prompt")
  sparse_req = sparse_ctrl_request(args)
  sparse = keyframes = None
  if sparse_req:   # before the base model: a wrong file or image fails fast
    sparse = load_sparse_ctrl_file(sparse_req)
    keyframes = load_keyframe_images(sparse_req["images"], args.height,
                                     args.width, sparse_req["normalize"])
  init_video = None
  if getattr(args, "init_video", None):   # before the base model, as SparseCtrl's inputs
    from adiff_jax.video_io import fit_frames, read_frames
    if not 0.0 <= args.strength <= 1.0:
      raise InputError(f"--strength must be in [0, 1], got {args.strength}")
    init_video = fit_frames(read_frames(args.init_video), args.frames, args.height,
                            args.width, "--init-video", args.init_video)
  cn_req = controlnet_request(args)
  if cn_req:   # the control videos before the base model too
    from adiff_jax.video_io import fit_frames, read_frames
    for r in cn_req:
      r["frames"] = fit_frames(read_frames(r["video"]), args.frames, args.height,
                               args.width, "control video", r["video"])
  cfg, params, lora, desc = load_model(args)
  controlnets = []
  if cn_req:
    from convert_weights.controlnet_files import load_controlnet
    for r in cn_req:
      tree, cn_cfg, cn_unet = load_controlnet(r["path"], unet=cfg.unet)
      controlnets.append((cn_cfg, cn_unet, tree))
  builtin = builtin_lib.is_builtin(args.ckpt)
  if cfg.is_sdxl and args.family != "sdxl":   # a pickled SDXL file: its defaults now
    resolve_defaults(args, "sdxl")
    schedule = cli_schedule(args)
  h, w = args.height, args.width
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
                      sparse_ctrl=SparseCtrlSampling(sparse_req["scale"]) if sparse_req else None,
                      strength=float(getattr(args, "strength", 0.8)),
                      controlnets=tuple(ControlNetSampling(r["scale"], r["start"], r["end"],
                                                           bool(getattr(args, "guess_mode", False)))
                                        for r in cn_req),
                      schedule=schedule, **long_video)
  mesh = None
  if len(jax.devices()) > 1:
    mesh = make_mesh(frames=args.mesh_frames)
  pipe = Pipeline(cfg, params, lora=lora, dtype=args.dtype, mesh=mesh, attention_impl=args.attention_impl,
                  sparse_ctrl=sparse, controlnets=controlnets)
  pipe.check(sc)
  print(f"model: {desc}{' (SDXL)' if cfg.is_sdxl else ''}")
  control = None
  if sparse_req:
    # RGB keyframes: one VAE posterior draw for all samples (as the official script), from seed 0's key
    control = pipe.sparse_condition(keyframes[None], sparse_req["indices"], sc,
                                    key=jax.random.fold_in(seed_key(seeds[0]), 1 << 22))
    print(f"SparseCtrl {sparse[0].kind}: {sparse_req['path']}, keyframes at {sparse_req['indices']}, "
          f"scale {sparse_req['scale']}")
  print(f"sampling {len(prompts)} video(s): {sc.frames} frames {h}x{w}, {sc.steps} {sc.scheduler} "
        f"steps, guidance {sc.guidance_scale}, dtype {args.dtype}, seeds {seeds}")
  if sc.context is not None and sc.frames > sc.context.context_length:
    c = sc.context
    print(f"context windows: {c.context_length} frames, overlap {c.overlap}, {c.schedule} schedule"
          f"{' (closed loop)' if c.closed_loop else ''}, {c.fuse} fusion, "
          f"{pipe.context_batch(sc)} window(s) per UNet call")
  for r in cn_req:
    print(f"ControlNet {r['path']}: scale {r['scale']}, steps {r['start']:g}..{r['end']:g} of the "
          f"schedule, control frames {r['video']}{', guess mode' if args.guess_mode else ''}")
  if init_video is not None:
    print(f"video-to-video: {args.init_video}, strength {sc.strength}: steps {sc.start_step() + 1}.."
          f"{sc.steps} of {sc.steps} run")
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
    # SDXL without a negative prompt: diffusers' zero unconditional embeddings
    frames = to_uint8(pipe(prompts, negative if neg_given or not cfg.is_sdxl else None, seeds, sc,
                           control=control,
                           init_video=None if init_video is None else init_video[None],
                           controlnet_frames=[r["frames"][None] for r in cn_req] or None))
  except FloatingPointError as e:
    raise InputError(str(e)) from None
  print(f"done in {time.perf_counter() - t0:.1f} s (including compilation)")

  os.makedirs(os.path.join(out_dir, "sample"), exist_ok=True)
  written = []
  for i, (p, s, v) in enumerate(zip(prompts, seeds, frames)):
    stem = os.path.join(out_dir, "sample", f"{i}-{_slug(prompt_travel.describe(p))}-seed{s}")
    written += [save_gif(v, stem + ".gif", args.fps), save_mp4(v, stem + ".mp4", args.fps)]
  written.append(save_gif(grid(list(frames)), os.path.join(out_dir, "sample.gif"), args.fps))
  if sparse_req:   # the prepared condition images, as the official script saves them
    from PIL import Image
    os.makedirs(os.path.join(out_dir, "control_images"), exist_ok=True)
    for i, im in enumerate(to_uint8(keyframes)):
      written.append(os.path.join(out_dir, "control_images", f"{i}.png"))
      Image.fromarray(im).save(written[-1])
  resolved = dict(ckpt=args.ckpt or "builtin", motion_module=args.motion_module,
                  motion_lora=args.motion_lora, domain_adapter=args.domain_adapter, lora=args.lora,
                  prompt=prompts, n_prompt=negative, seed=seeds, steps=sc.steps,
                  guidance_scale=sc.guidance_scale, scheduler=sc.scheduler, W=w, H=h, L=sc.frames,
                  dtype=args.dtype, fps=args.fps, clip_skip=sc.clip_skip,
                  **_long_video_resolved(args),
                  **({} if not sparse_req else dict(
                      controlnet_path=sparse_req["path"], controlnet_images=sparse_req["images"],
                      controlnet_image_indexs=sparse_req["indices"],
                      controlnet_conditioning_scale=sparse_req["scale"])),
                  **({} if init_video is None else dict(init_video=args.init_video, strength=sc.strength)),
                  **({} if not cn_req else dict(
                      controlnets=[{k: r[k] for k in ("path", "video", "scale", "start", "end")}
                                   for r in cn_req], guess_mode=bool(args.guess_mode))),
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
