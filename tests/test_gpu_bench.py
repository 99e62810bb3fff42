"""bench/gpu.sh --reduced: the prepared GPU benchmark runs end to end on CPU (tiny model), both
frameworks, each part in its own process, results written as JSON lines plus the RESULTS.md rows."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("jax_sample", "torch_sample", "jax_train", "torch_train", "jax_attention")
TIMINGS = {"jax_sample": ("e2e_s", "denoise_s_per_step", "vae_decode_s"),
           "torch_sample": ("e2e_s", "denoise_s_per_step", "vae_decode_s"),
           "jax_train": ("step_s", "compile_s"), "torch_train": ("step_s",), "jax_attention": ()}
# One xdist worker runs this module, so the reduced benchmark (its module fixture) runs once.
pytestmark = pytest.mark.xdist_group("gpu_bench")


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
  pytest.importorskip("diffusers")
  out = tmp_path_factory.mktemp("gpu_out")
  env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
  proc = subprocess.run(["bash", "bench/gpu.sh", "--reduced"], cwd=ROOT, env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:]
  recs = [json.loads(line) for line in open(out / "results.jsonl")]
  by_part = {}
  for r in recs:
    by_part.setdefault(r["part"], {})[r["name"]] = r
  return out, proc.stdout, by_part


def test_every_part_ran_and_timed(reduced_run):
  _, stdout, res = reduced_run
  for part in PARTS:
    got = res.get(part, {})
    assert got.get("status", {}).get("value") == "ok", (part, got.get("error"), stdout[-3000:])
    for name in TIMINGS[part]:
      assert got[name]["value"] > 0, (part, name, got[name])
    assert "error" not in got
  # The diffusers half really ran: its own process reported diffusers and timed the pipeline.
  assert res["torch_sample"]["env"]["value"]["diffusers"]
  assert res["torch_sample"]["denoise_s"]["value"] > 0
  # The attention part timed every shape of the video through XLA; cuDNN refused each on CPU
  # (recorded with the reason, not a crash).
  attn = {n: r for n, r in res["jax_attention"].items() if n.startswith("attn ")}
  kinds = {k for k, *_ in attention_shapes_reduced()}
  assert {n[len("attn "):].rsplit(" ", 1)[0] for n in attn} == kinds
  for n, r in attn.items():
    if n.endswith(" xla"):
      assert r["value"]["fwd"] > 0 and r["value"]["fwd_bwd"] > 0, r
    else:
      assert r["value"]["fwd"] is None and r["value"]["fwd_error"], r
  # CPU: no memory_stats peak and no peak FLOP/s -> null, not a crash.
  assert res["jax_sample"]["peak_mem_gib"]["value"] is None
  assert res["jax_sample"]["mfu_e2e_pct"]["value"] is None


def test_rows_file(reduced_run, tmp_path):
  out, stdout, _ = reduced_run
  rows_md = (out / "rows.md").read_text()
  rows = [line for line in rows_md.splitlines() if line.startswith("| 2")]
  n_attn = len(attention_shapes_reduced())
  assert len(rows) == 6 + n_attn and all("`bash bench/gpu.sh --reduced`" in r for r in rows)
  e2e = next(r for r in rows if "sampling end to end" in r)
  assert e2e.split("|")[8].strip().endswith("x"), e2e   # speed-up vs diffusers is filled in
  assert rows[0] in stdout
  # --append-rows puts them under their own section of a RESULTS.md.
  results = tmp_path / "RESULTS.md"
  results.write_text("# Benchmark results\n\n## Other\n\n| a |\n|---|\n| 1 |\n")
  subprocess.run([sys.executable, "bench/gpu_bench.py", "--append-rows", str(out / "rows.md"),
                  "--results", str(results)], cwd=ROOT, check=True, capture_output=True)
  text = results.read_text()
  dated = [line for line in text.splitlines() if line.startswith("| 20")]   # rows start with their date
  assert "## GPU side by side (bench/gpu.sh)" in text and len(dated) == 6 + n_attn
  assert text.index("## Other") < text.index("## GPU side by side")
  # The attention rows go under their own section, with its header, not the side-by-side table.
  side, attn = text.split("## GPU attention routing")
  assert len([l for l in side.splitlines() if l.startswith("| 20")]) == 6
  assert len([l for l in attn.splitlines() if l.startswith("| 20")]) == n_attn
  assert "| cuDNN fwd ms |" in attn


def attention_shapes_reduced():
  sys.path.insert(0, ROOT)
  from bench.gpu_bench import REDUCED, attention_shapes
  return attention_shapes(REDUCED)
