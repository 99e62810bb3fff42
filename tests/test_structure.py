"""The project's shape (issue 13): one-way dependencies, no import circles, one loader, one way to
set dtypes, entry points that report known errors in one line."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adiff_jax import model_dir
from adiff_jax.errors import InputError
from adiff_jax.model import ModelConfig, param_shapes, random_params
from adiff_jax.motion_module import (image_model_alone, is_motion_module, merge_motion_module,
                                     split_motion_module)
from adiff_jax.params import flatten
from adiff_jax.sampling import Pipeline
from adiff_jax.vae import AutoencoderKL, decode_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for the library, the converters, bench, tools and entry points."""
  out = {}
  for top in ("adiff_jax", "convert_weights", "bench", "tools"):
    for root, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(root, f), ROOT)[:-3].replace(os.sep, ".")
          out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
  for f in ("sample.py", "train.py"):
    out[f[:-3]] = os.path.join(ROOT, f)
  return out


def _imports(path: str, name: str, known: set[str]) -> set[str]:
  """Project modules `path` imports, at the top or inside functions (lazily)."""
  pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      found.add(base)
      found |= {f"{base}.{a.name}" for a in node.names}   # `from pkg import module`
  return {m for m in found if m in known}


GRAPH = {name: _imports(path, name, set(_modules())) - {name} for name, path in _modules().items()}


def test_library_never_imports_the_converters_or_the_cli():
  for name, deps in GRAPH.items():
    if name.startswith("adiff_jax"):
      bad = sorted(d for d in deps if d.startswith(("convert_weights", "bench", "tools")) or d in ("sample", "train"))
      assert not bad, f"{name} imports {bad}"


def test_bench_and_tools_do_not_import_the_cli():
  for name, deps in GRAPH.items():
    if name.startswith(("bench", "tools")):
      assert "sample" not in deps and "train" not in deps, f"{name} imports an entry point"


def test_no_import_circles():
  state: dict[str, int] = {}

  def visit(n, stack):
    state[n] = 1
    for d in GRAPH.get(n, ()):
      if state.get(d) == 1:
        raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d, stack + [d])
    state[n] = 2

  for n in GRAPH:
    if n not in state:
      visit(n, [n])


def test_the_graph_sees_imports():
  """The checks above can fail: the scanner finds the library's known imports, lazy ones too."""
  assert "adiff_jax.model_dir" in GRAPH["sample"]             # a lazy import inside load_model
  assert "adiff_jax.model" in GRAPH["adiff_jax.model_dir"]
  assert "adiff_jax" in GRAPH["convert_weights.convert"] or "adiff_jax.model_dir" in GRAPH["convert_weights.convert"]


# ------------------------------------------------------------------------------ the motion module API


def test_motion_module_split_merge_and_image_model():
  cfg = ModelConfig.tiny()
  params = random_params(cfg)
  image, mm = split_motion_module(params["unet"])
  assert flatten(mm) and all(is_motion_module(k) for k in flatten(mm))
  assert not any(is_motion_module(k) for k in flatten(image))
  assert set(flatten(merge_motion_module(image, mm))) == set(flatten(params["unet"]))
  with pytest.raises(InputError, match="both trees define"):
    merge_motion_module(params["unet"], mm)
  c2, p2 = image_model_alone(cfg, params)
  assert c2.motion is None and flatten(p2["unet"]).keys() == flatten(image).keys()
  # A fresh motion module is the identity: its output projections are zero.
  proj = [v for k, v in flatten(mm).items() if k.endswith("proj_out/kernel")]
  assert proj and all(not np.any(v) for v in proj)
  assert set(flatten(param_shapes(cfg)["unet"])) == set(flatten(params["unet"]))


# ------------------------------------------------------------------------------ model dirs and the loader


def _tiny_dir(tmp_path, name="m", **extra_meta):
  cfg = ModelConfig.tiny()
  params = random_params(cfg, seed=3)
  image, mm = split_motion_module(params["unet"])
  meta = {"configs": model_dir.configs_metadata(cfg), "versions": {"motion_module": "test"}, **extra_meta}
  path = str(tmp_path / name)
  model_dir.save(path, {"unet": image, "motion_module": mm, "text_encoder": params["text_encoder"],
                        "vae": params["vae"]}, meta)
  return path, cfg, params


def test_load_round_trip_and_strict_configs(tmp_path):
  path, cfg, params = _tiny_dir(tmp_path)
  got_cfg, got, lora, meta = model_dir.load(path)
  assert got_cfg == cfg and lora is None
  for part in ("unet", "text_encoder", "vae"):
    a, b = flatten(got[part]), flatten(params[part])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # An unknown config key is an error naming the key and the file.
  m = json.load(open(os.path.join(path, "metadata.json")))
  m["configs"]["unet"]["attention_hedas"] = 4
  json.dump(m, open(os.path.join(path, "metadata.json"), "w"))
  with pytest.raises(InputError, match=r"metadata.json.*unet.attention_hedas"):
    model_dir.load(path)
  # Directories written before configs became architecture-only carried dtypes: still load.
  del m["configs"]["unet"]["attention_hedas"]
  m["configs"]["vae"].update(dtype="float32", param_dtype="float32")
  json.dump(m, open(os.path.join(path, "metadata.json"), "w"))
  assert model_dir.load(path)[0] == cfg
  assert "dtype" not in model_dir.configs_metadata(cfg)["vae"]


def test_load_applies_separate_motion_module_and_lora_alphas(tmp_path):
  from adiff_jax import lora as lora_lib
  path, cfg, params = _tiny_dir(tmp_path)
  other, _, p2 = _tiny_dir(tmp_path, "other")
  # A separate motion module replaces the model's own.
  _, got, _, _ = model_dir.load(path, motion_module=other)
  _, want_mm = split_motion_module(p2["unet"])
  _, got_mm = split_motion_module(got["unet"])
  assert all(np.array_equal(flatten(got_mm)[k], v) for k, v in flatten(want_mm).items())
  # A MotionLoRA dir at alpha 0.5: its stored strength times the alpha.
  tree = jax.tree.map(np.asarray, lora_lib.init_lora(jax.random.key(0), params["unet"], 4,
                                                     lora_lib.motion_lora_filter, alpha=0.8))
  lp = str(tmp_path / "lora")
  model_dir.save(lp, {"motion_lora_0": tree}, {"motion_loras": [{"item": "motion_lora_0", "alpha": 0.8}]})
  _, _, lora, _ = model_dir.load(path, motion_loras=[(lp, 0.5)])
  scales = [v for k, v in flatten(lora).items() if k.endswith("/scale")]
  assert scales and all(np.allclose(s, 0.4) for s in scales)
  with pytest.raises(InputError, match="not a model directory"):
    model_dir.load(str(tmp_path))
  with pytest.raises(InputError, match="not found"):
    model_dir.load(path, motion_loras=[(str(tmp_path / "nope"), 1.0)])


# ------------------------------------------------------------------------------ dtypes


def test_bf16_pipeline_runs_every_model_in_bf16():
  cfg = ModelConfig.tiny()
  pipe = Pipeline(cfg, random_params(cfg), dtype="bf16")
  assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == jnp.bfloat16
  assert Pipeline(cfg, random_params(cfg)).vae.dtype == jnp.float32     # f32 stays the default


def test_vae_decode_computes_in_bf16_and_agrees_with_f32():
  cfg = ModelConfig.tiny()
  params = {"params": random_params(cfg)["vae"]}
  z = jax.random.normal(jax.random.key(1), (1, 4, 8, 8, cfg.vae.latent_channels))
  f32 = AutoencoderKL(cfg.vae)
  bf16 = AutoencoderKL(cfg.vae, dtype=jnp.bfloat16)
  decode = lambda m, p, x: m.apply(p, x, method=AutoencoderKL.decode)
  jaxpr = jax.make_jaxpr(lambda p, x: decode(bf16, p, x))(params, z[0])
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
  ref_convs = [e for e in jax.make_jaxpr(lambda p, x: decode(f32, p, x))(params, z[0]).eqns
               if e.primitive.name == "conv_general_dilated"]
  assert ref_convs and all(v.aval.dtype == jnp.float32 for e in ref_convs for v in e.invars)
  a = np.asarray(decode_video(f32, params, z), np.float32)
  b = np.asarray(decode_video(bf16, params, z.astype(jnp.bfloat16)), np.float32)
  err = np.abs(a - b).max() / np.abs(a).max()
  assert 0 < err < 5e-2, err            # bf16 rounding: close, yet really a different computation


# ------------------------------------------------------------------------------ entry points


@pytest.mark.parametrize("argv,needle", [
    (["sample.py", "--ckpt", "/no/such/model.safetensors"], "not found"),
    (["sample.py", "--ckpt", "builtin:random", "--height", "36"], "multiples of"),
    (["sample.py", "--ckpt", "builtin:random", "--frames", "48"], "positional encoding"),
    (["train.py", "--config", "configs/training/tiny.yaml", "optim.schedule=linear"], "optim.schedule"),
    (["train.py", "--config", "configs/training/tiny.yaml", "stepz=3"], "unknown config key(s) stepz"),
    (["-m", "convert_weights", "inspect", "/no/such/file.ckpt"], "no such file"),
])
def test_entry_points_report_known_errors_in_one_line(argv, needle):
  r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: ") and needle in lines[-1], r.stderr[-2000:]
  assert "Traceback" not in r.stderr
