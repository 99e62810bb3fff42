"""Peak memory of converting a full-size SD1.5 LDM checkpoint (fp16, ~2 GB) to Orbax.

    python bench/convert_memory.py [--dtype keep|fp16|fp32|bf16] [--keep-files]

Creates the file (random fp16 data from our shape tables, real LDM key names) in a temp dir,
runs `python -m convert_weights to-orbax --base FILE --out DIR` in a subprocess and reports
the child's peak RSS, the file size and the wall time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_file(path: str) -> None:
  import jax
  import numpy as np
  from adiff_jax.clip_text import CLIPTextConfig
  from adiff_jax.unet import UNetConfig
  from adiff_jax.vae import VAEConfig
  from adiff_jax.model import param_shapes
  from convert_weights import sd_base as base

  rng = np.random.default_rng(0)
  rand = lambda tree: jax.tree.map(
      lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02).astype(np.float16), tree)
  base.export_ldm(path, rand(param_shapes(UNetConfig.sd15())),
                  rand(param_shapes(VAEConfig.sd15())), rand(param_shapes(CLIPTextConfig.sd15())))


def du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dtype", default="keep", choices=["keep", "fp16", "fp32", "bf16"])
  ap.add_argument("--keep-files", action="store_true")
  a = ap.parse_args()
  tmp = tempfile.mkdtemp(prefix="convert_memory_")
  try:
    src = os.path.join(tmp, "sd15_fp16.safetensors")
    t0 = time.time()
    # A child process makes the file, so its memory does not count in the measurement below.
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
                    f"from bench.convert_memory import make_file; make_file({src!r})"], check=True, cwd=ROOT)
    print(f"made {src}: {os.path.getsize(src) / 2**30:.2f} GiB in {time.time() - t0:.0f} s")
    cmd = [sys.executable, "-m", "convert_weights", "to-orbax", "--base", src, "--dtype", a.dtype,
           "--out", os.path.join(tmp, "orbax")]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB)
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
      raise SystemExit("conversion failed")
    print(f"file size: {os.path.getsize(src) / 2**30:.2f} GiB; Orbax dir: "
          f"{du(os.path.join(tmp, 'orbax')) / 2**30:.2f} GiB")
    print(f"to-orbax --dtype {a.dtype}: peak RSS {usage.ru_maxrss / 2**20:.2f} GiB, wall {wall:.0f} s")
  finally:
    if not a.keep_files:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
