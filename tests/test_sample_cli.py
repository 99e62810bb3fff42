"""sample.py end to end on the built-in tiny model, prompt-config YAML handling and bad input."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
from adiff_jax.builtin import DEFAULT_PROMPTS  # noqa: E402
from adiff_jax.errors import run_cli  # noqa: E402
from adiff_jax.video_io import read_video  # noqa: E402

FAST = ["--frames", "4", "--steps", "2", "--height", "32", "--width", "32"]


def assert_cli_error(argv, needle):
  """A known error: one `error: ...` line on stderr and exit status 2, as the CLI reports it."""
  import contextlib
  import io
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    assert run_cli(sample.main, argv) == 2
  lines = err.getvalue().strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def _outputs(out):
  (run,) = os.listdir(out)
  return os.path.join(out, run)


def test_builtin_default_writes_gif_mp4_grid_and_config(tmp_path, capsys):
  assert sample.main(FAST + ["--seed", "3", "--num-samples", "2", "--out", str(tmp_path)]) == 0
  log = capsys.readouterr().out
  from adiff_jax.builtin import trained_model_dir
  assert ("trained on synthetic" if trained_model_dir() else "RANDOM weights") in log
  run = _outputs(tmp_path)
  files = sorted(os.listdir(os.path.join(run, "sample")))
  # The default prompts show the built-in model off: several colours and shapes, one grid.
  assert len(DEFAULT_PROMPTS) >= 4 and len({p.split()[1] for p in DEFAULT_PROMPTS}) >= 4
  assert len([f for f in files if f.endswith(".gif")]) == 2 * len(DEFAULT_PROMPTS)
  assert len([f for f in files if f.endswith(".mp4")]) == 2 * len(DEFAULT_PROMPTS)
  gif = read_video(os.path.join(run, "sample", files[0]))
  assert gif.shape == (4, 32, 32, 3)
  mp4 = read_video(os.path.join(run, "sample", [f for f in files if f.endswith(".mp4")][0]))
  assert mp4.shape == (4, 32, 32, 3)
  grid = read_video(os.path.join(run, "sample.gif"))
  assert grid.shape[0] == 4 and grid.shape[2] > 64
  cfg = yaml.safe_load(open(os.path.join(run, "config.yaml")))
  assert cfg["seed"] == [3] * 2 * len(DEFAULT_PROMPTS) and cfg["L"] == 4 and cfg["steps"] == 2
  assert cfg["prompt"] == [p for p in DEFAULT_PROMPTS for _ in range(2)]
  assert cfg["noise_scheduler_kwargs"]["beta_schedule"] == "linear"


def test_builtin_motion_lora_and_random_model(tmp_path, capsys):
  assert sample.main(FAST + ["--motion-lora", "builtin:up:0.5", "--prompt", "a red circle",
                             "--out", str(tmp_path / "a")]) == 0
  assert "MotionLoRA builtin:up" in capsys.readouterr().out
  assert sample.main(FAST + ["--ckpt", "builtin:random", "--prompt", "a red circle",
                             "--out", str(tmp_path / "b")]) == 0
  assert "RANDOM weights" in capsys.readouterr().out
  assert_cli_error(FAST + ["--motion-lora", "builtin:sideways"], "unknown built-in MotionLoRA")
  assert_cli_error(FAST + ["--ckpt", "builtin:random", "--motion-lora", "builtin:up"], "random")


def test_same_seed_same_video_different_seed_differs(tmp_path):
  sample.main(FAST + ["--prompt", "a red circle", "--seed", "5", "5", "6", "--num-samples", "3",
                      "--out", str(tmp_path)])
  run = _outputs(tmp_path)
  gifs = sorted(f for f in os.listdir(os.path.join(run, "sample")) if f.endswith(".gif"))
  out = [read_video(os.path.join(run, "sample", g)) for g in gifs]   # 0-..seed5, 1-..seed5, 2-..seed6
  assert len(out) == 3
  np.testing.assert_array_equal(out[0], out[1])
  assert np.abs(out[0].astype(int) - out[2].astype(int)).max() > 0


def test_prompt_config_yaml(tmp_path):
  cfg = tmp_path / "p.yaml"
  cfg.write_text(textwrap.dedent("""
      - prompt: ["a red circle moving left", "a blue square moving up"]
        n_prompt: ["blurry"]
        seed: [1, 2]
        steps: 2
        guidance_scale: 5.0
        W: 32
        H: 32
        L: 4
        some_new_key: 1
  """))
  with pytest.warns(UserWarning, match="some_new_key"):
    assert sample.main(["--config", str(cfg), "--out", str(tmp_path / "o")]) == 0
  run = _outputs(tmp_path / "o")
  resolved = yaml.safe_load(open(os.path.join(run, "config.yaml")))
  assert resolved["prompt"] == ["a red circle moving left", "a blue square moving up"]
  assert resolved["n_prompt"] == ["blurry", "blurry"] and resolved["guidance_scale"] == 5.0
  assert resolved["seed"] == [1, 2]


def test_prompt_config_errors(tmp_path):
  ctl = tmp_path / "c.yaml"
  ctl.write_text("- prompt: [x]\n  controlnet_path: sparsectrl.ckpt\n")
  assert_cli_error(["--config", str(ctl)], "needs keyframe images")   # SparseCtrl: tests/test_sparse_ctrl_cli.py
  bad = tmp_path / "b.yaml"
  bad.write_text("- prompt: [x\n  seed: 1:\n")
  assert_cli_error(["--config", str(bad)], "cannot read YAML")
  assert_cli_error(["--config", str(tmp_path / "missing.yaml")], "not found")


def test_bad_arguments_fail_before_compiling(tmp_path):
  assert_cli_error(["--ckpt", str(tmp_path / "nope.safetensors")], "not found")
  assert_cli_error(["--frames", "4", "--height", "36", "--width", "32", "--out", str(tmp_path)], "multiples of")
  assert_cli_error(["--frames", "48", "--height", "32", "--width", "32", "--out", str(tmp_path)],
                   "positional encoding")


def test_help_lists_options():
  r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--help"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0
  for opt in ("--ckpt", "--negative-prompt", "--frames", "--scheduler", "--motion-lora",
              "--domain-adapter", "--dtype", "--fps", "--config", "--num-samples"):
    assert opt in r.stdout


def test_persistent_compilation_cache(tmp_path):
  """A second run with the same shapes compiles nothing; --no-compile-cache leaves no cache."""
  def run(*extra):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *FAST, "--ckpt", "builtin:random",
                        "--prompt", "a red circle", "--seed", "1", "--out", str(tmp_path / "o"), *extra],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout
  cache = str(tmp_path / "xla")
  first = run("--compile-cache", cache)
  assert f"XLA compilation cache: {cache}" in first
  compiled = int(first.split("cache hits, ")[1].split(" compiled")[0])
  assert compiled > 0 and os.listdir(cache)
  second = run("--compile-cache", cache)
  assert "cache hits, 0 compiled" in second, second
  off = run("--no-compile-cache", "--compile-cache", str(tmp_path / "unused"))
  assert "compilation cache" not in off and not os.path.exists(tmp_path / "unused")
