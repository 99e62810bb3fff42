"""End-to-end sampling time, this project vs diffusers AnimateDiffPipeline, same config and device.

  python bench/sample.py --config sd15 --frames 16 --size 512 --steps 25      # GPU / TPU
  python bench/sample.py --config sd15 --frames 8 --size 128 --steps 3        # CPU, reduced
  python bench/sample.py --config tiny --frames 16 --size 64 --few-step        # 4-step LCM vs 25-step DDIM

Text encoding + denoising loop with CFG + VAE decode, random weights (speed does not depend on
them). Reports seconds end to end (after a warm-up run that includes compilation), UNet steps/s,
the ratio and each side's peak resident memory (each framework in its own process,
bench/side_by_side.py); appends a row to bench/RESULTS.md with the command.

--few-step (adiff-jax only): the same video with --steps DDIM steps at guidance 7.5 (official),
--few-steps LCM steps at guidance 1.5 (AnimateLCM's settings) and --few-steps Euler "trailing"
steps at guidance 1 (AnimateDiff-Lightning's, conditional half only); its own table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import torch

from adiff_jax.model import random_params
from adiff_jax.model import ModelConfig
from adiff_jax.sampling import Pipeline, SamplingConfig
from adiff_jax.schedulers import NoiseSchedule
from bench import side_by_side
from bench.results import add_row, command


def torch_pipeline(config: ModelConfig, device, dtype):
  from diffusers import (AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter,
                         UNet2DConditionModel)
  from transformers import CLIPTextConfig as HFConfig, CLIPTextModel, CLIPTokenizer
  import tempfile
  from adiff_jax.tokenizer import CLIPTokenizer as Ours
  u, m, t, v = config.unet, config.motion, config.text, config.vae
  unet = UNet2DConditionModel(
      block_out_channels=u.block_out_channels, layers_per_block=u.layers_per_block,
      attention_head_dim=u.heads[0], cross_attention_dim=u.cross_attention_dim,
      norm_num_groups=u.norm_num_groups,
      down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in u.cross_attention_levels),
      up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in u.cross_attention_levels[::-1]))
  adapter = MotionAdapter(block_out_channels=u.block_out_channels, motion_layers_per_block=u.layers_per_block,
                          motion_num_attention_heads=m.num_heads, motion_norm_num_groups=m.norm_groups,
                          motion_max_seq_length=m.max_len, use_motion_mid_block=m.mid_block)
  text = CLIPTextModel(HFConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                                num_attention_heads=t.num_heads, hidden_act=t.hidden_act))
  nv = len(v.block_out_channels)
  vae = AutoencoderKL(block_out_channels=v.block_out_channels, layers_per_block=v.layers_per_block,
                      norm_num_groups=v.norm_num_groups, latent_channels=v.latent_channels,
                      down_block_types=("DownEncoderBlock2D",) * nv, up_block_types=("UpDecoderBlock2D",) * nv)
  d = tempfile.mkdtemp()
  Ours.default().save_pretrained(d)
  tok = CLIPTokenizer.from_pretrained(d, pad_token="<|endoftext|>", model_max_length=77)
  sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
  pipe = AnimateDiffPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                             motion_adapter=adapter, scheduler=sched)
  return pipe.to(device=device, dtype=dtype)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", choices=["sd15", "tiny"], default="sd15")
  ap.add_argument("--frames", type=int, default=16)
  ap.add_argument("--size", type=int, default=512)
  ap.add_argument("--steps", type=int, default=25)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  ap.add_argument("--few-step", action="store_true",
                  help="adiff-jax only: --steps DDIM vs --few-steps LCM and Euler trailing (own table)")
  ap.add_argument("--few-steps", type=int, default=4)
  ap.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)   # a child process
  args = ap.parse_args()

  config = ModelConfig.sd15("v2") if args.config == "sd15" else ModelConfig.tiny()
  if args.few_step:
    return few_step(args, config)
  prompts = ["a red circle moving left"] * args.batch
  negative = ["blurry"] * args.batch
  sc = SamplingConfig(frames=args.frames, height=args.size, width=args.size, steps=args.steps)
  if args.side == "torch":
    return side_by_side.report(seconds=torch_side(args, config, prompts, negative))
  if args.side == "jax":
    params = random_params(config, seed=0)
    ours = Pipeline(config, params, dtype=args.dtype)
    seeds = list(range(args.batch))
    t0 = time.perf_counter()
    ours(prompts, negative, seeds, sc, progress=False)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours(prompts, negative, seeds, sc, progress=False)
    return side_by_side.report(seconds=time.perf_counter() - t0, first=first,
                               device=jax.devices()[0].device_kind, platform=jax.devices()[0].platform)

  argv = sys.argv[1:]
  j = side_by_side.run(__file__, argv, "jax")
  t = None if args.skip_torch else side_by_side.run(__file__, argv, "torch")
  jax_s, torch_s = j["seconds"], t and t["seconds"]
  print(f"adiff-jax ({j['platform']}, {args.dtype}): {jax_s:.2f} s end to end "
        f"(first run with compilation {j['first']:.1f} s), {args.steps / jax_s:.2f} UNet steps/s, "
        f"peak RSS {j['peak_rss_gib']:.2f} GiB")
  ratio = f"{torch_s / jax_s:.2f}x" if torch_s else "n/a"
  t_rss = f"{t['peak_rss_gib']:.2f}" if t else "n/a"
  print(f"speed-up: {ratio}; peak RSS GiB: adiff-jax {j['peak_rss_gib']:.2f}, diffusers {t_rss}")
  row = (f"| {time.strftime('%Y-%m-%d')} | {j['device']} | {args.config} | {args.batch}x{args.frames}x"
         f"{args.size}x{args.size}, {args.steps} steps, CFG | {args.dtype} | "
         f"{torch_s and f'{torch_s:.2f}'} | {jax_s:.2f} | {ratio} | {t_rss} | {j['peak_rss_gib']:.2f} | "
         f"`{command(__file__)}` |\n")
  add_row(args.results, "Sampling end to end, side by side with memory (bench/sample.py)",
          "Each framework in its own process; peak RSS = that process's peak resident memory "
          "(runtime included).\n\n"
          "| date | device | config | video | JAX dtype | diffusers s | adiff-jax s | speed-up | "
          "diffusers peak RSS GiB | adiff-jax peak RSS GiB | command |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|", row)


def torch_side(args, config, prompts, negative) -> float:
  """diffusers' seconds end to end, after a 1-step warm-up."""
  gpu = torch.cuda.is_available()
  tdev, tdt = ("cuda", torch.float16) if gpu else ("cpu", torch.float32)
  pipe = torch_pipeline(config, tdev, tdt)
  kw = dict(prompt=prompts, negative_prompt=negative, num_frames=args.frames, height=args.size,
            width=args.size, num_inference_steps=args.steps, guidance_scale=7.5, output_type="np")
  with torch.no_grad():
    pipe(**{**kw, "num_inference_steps": 1})  # warm-up
    t0 = time.perf_counter()
    pipe(**kw)
    if gpu:
      torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
  print(f"diffusers ({tdev}, {tdt}): {seconds:.2f} s end to end, {args.steps / seconds:.2f} UNet steps/s")
  return seconds


def few_step(args, config: ModelConfig):
  """Seconds end to end (after a warm-up run that compiles) per sampler, one process, one model."""
  prompts, negative = ["a red circle moving left"] * args.batch, ["blurry"] * args.batch
  seeds = list(range(args.batch))
  ours = Pipeline(config, random_params(config, seed=0), dtype=args.dtype)
  runs = [("ddim", args.steps, 7.5, NoiseSchedule.animatediff()),
          ("lcm", args.few_steps, 1.5, NoiseSchedule.animatelcm()),
          ("euler", args.few_steps, 1.0, NoiseSchedule.lightning())]
  secs = []
  for name, steps, guidance, schedule in runs:
    sc = SamplingConfig(frames=args.frames, height=args.size, width=args.size, steps=steps,
                        guidance_scale=guidance, scheduler=name, schedule=schedule)
    ours(prompts, negative, seeds, sc, progress=False)   # warm-up (compiles)
    t0 = time.perf_counter()
    ours(prompts, negative, seeds, sc, progress=False)
    secs.append(time.perf_counter() - t0)
    print(f"{name} {steps} steps, guidance {guidance}: {secs[-1]:.2f} s end to end")
  ratio = f"{secs[0] / secs[1]:.2f}x"
  print(f"LCM speed-up over DDIM: {ratio}")
  dev = jax.devices()[0]
  row = (f"| {time.strftime('%Y-%m-%d')} | {dev.device_kind} | {args.config} | {args.batch}x{args.frames}x"
         f"{args.size}x{args.size}, {args.steps} / {args.few_steps} steps | {args.dtype} | {secs[0]:.2f} | {secs[1]:.2f} | {secs[2]:.2f} | "
         f"{ratio} | `{command(__file__)}` |\n")
  add_row(args.results, "Few-step sampling (bench/sample.py --few-step)",
          "Text encoder + denoising loop + VAE decode, adiff-jax only, timed after a warm-up run:\n"
          "DDIM at guidance 7.5 (official settings, CFG), LCM at guidance 1.5 (AnimateLCM:\n"
          "original_inference_steps 100, CFG) and Euler \"trailing\" at guidance 1 (AnimateDiff-Lightning:\n"
          "conditional half only). Random weights: speed only, not quality.\n\n"
          "| date | device | config | video, DDIM / few steps | JAX dtype | DDIM s | LCM s | "
          "Euler trailing, guidance 1 s | "
          "LCM speed-up | command |\n"
          "|---|---|---|---|---|---|---|---|---|---|", row)


if __name__ == "__main__":
  main()
