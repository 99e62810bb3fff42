"""Training metrics: tqdm progress bar, JSONL file, TensorBoard (when installed), MFU.

Only process 0 writes. MFU = achieved FLOP/s per device / the device's peak bf16 FLOP/s; the
step's FLOPs come from XLA's cost analysis of the compiled step, the peak from a small table
(unknown devices, CPU included, print 'n/a').
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax

# Peak dense bf16 FLOP/s per device (per chip for TPU, per GPU), from vendor datasheets.
PEAK_FLOPS = {
    "tpu v2": 45e12 / 2, "tpu v3": 123e12 / 2, "tpu v4": 275e12, "tpu v5 lite": 197e12,
    "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12, "tpu v6 lite": 918e12,
    "tpu v6e": 918e12, "tpu7x": 2307e12,
    "h200": 989e12, "h100": 989e12, "gh200": 989e12, "a100": 312e12, "l4": 121e12,
    "b200": 2250e12,
}


def device_peak_flops(device=None) -> Optional[float]:
  d = device or jax.devices()[0]
  kind = getattr(d, "device_kind", "").lower()
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):   # "tpu v5 lite" before "tpu v5"
    if name in kind:
      return PEAK_FLOPS[name]
  return None


def compiled_flops(compiled) -> Optional[float]:
  """FLOPs of one call of a compiled function, per device (XLA's cost analysis of the
  partitioned program), or None if the backend does not report them."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  flops = (ca or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def mfu(flops_per_step: Optional[float], step_seconds: float, peak: Optional[float]) -> Optional[float]:
  if not flops_per_step or not peak or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / peak


def _summary_writer(logdir: str):
  for mod in ("tensorboardX", "torch.utils.tensorboard"):
    try:
      m = __import__(mod, fromlist=["SummaryWriter"])
      return m.SummaryWriter(logdir)
    except Exception:   # not installed (torch's needs the tensorboard package)
      continue
  return None


class MetricsLogger:
  def __init__(self, out_dir: str, total_steps: int, start_step: int = 0, progress: bool = True,
               tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self.bar = self.tb = self.jsonl = None
    if not enabled:
      return
    os.makedirs(out_dir, exist_ok=True)
    self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")
    if tensorboard:
      self.tb = _summary_writer(os.path.join(out_dir, "tensorboard"))
    if progress:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                      dynamic_ncols=True)

  def log(self, step: int, metrics: dict, advance: int = 1, write: bool = True) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.update(advance)
    if not write:
      return
    clean = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
    if self.bar is not None:
      show = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}",
              "gnorm": f"{metrics['grad_norm']:.3f}",
              "samples/s": f"{metrics.get('samples_per_s', 0):.2f}",
              "mfu": "n/a" if metrics.get("mfu") is None else f"{100 * metrics['mfu']:.1f}%"}
      self.bar.set_postfix(show, refresh=False)
    self.jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self.tb.add_scalar(f"train/{k}", v, step)

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)
    if self.jsonl is not None:
      self.jsonl.write(json.dumps({"event": text, "time": time.time()}) + "\n")
      self.jsonl.flush()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.jsonl is not None:
      self.jsonl.close()
    if self.tb is not None:
      self.tb.close()
