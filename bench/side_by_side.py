"""One benchmark side (adiff-jax or PyTorch) per process, and what it measured read back.

Each framework runs in its own process: allocators and thread pools interfere otherwise, and the
process's peak resident memory (ru_maxrss) is then that framework's alone, runtime included (what
a user's machine has to hold). A side prints one `SIDE_RESULT {json}` line; `run` starts the
script again with `--side NAME`, echoes its output and returns that dict.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys

MARK = "SIDE_RESULT "


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # KiB on Linux


def report(**values) -> None:
  """Print this side's measurements (plus its peak RSS) for the parent."""
  print(MARK + json.dumps({**values, "peak_rss_gib": round(peak_rss_gib(), 3)}), flush=True)


def run(script: str, argv: list[str], side: str) -> dict:
  """Run `script argv --side side` in a child process; its SIDE_RESULT dict."""
  proc = subprocess.Popen([sys.executable, script, *argv, "--side", side], stdout=subprocess.PIPE,
                          text=True, bufsize=1)
  result = None
  for line in proc.stdout:
    if line.startswith(MARK):
      result = json.loads(line[len(MARK):])
    else:
      sys.stdout.write(line)
  if proc.wait() or result is None:
    raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
  return result
