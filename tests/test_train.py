"""Training: loss goes down, frozen weights stay bit-identical, exact resume, sharded and
multi-process runs equal the single-device run, bad videos are skipped, LoRA stages train only
LoRA weights, non-finite steps are skipped or stop the run.

Compilation dominates on CPU, so every in-process motion-module run shares one compiled step
(equal StepSpec => jit cache hit) and the subprocess runs start first, in the background.
"""
import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from adiff_jax import model_dir
from convert_weights.convert import export_stage
from adiff_jax.motion_module import is_motion_module
from adiff_jax.params import flatten
from adiff_jax.train import state as S
from adiff_jax.train.config import load_config
from adiff_jax.train.loop import NonFiniteLoss, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# One xdist worker runs this module: its module fixtures (the reference run and the 8-device and
# two-process runs started in the background) then run once, not once per worker.
pytestmark = pytest.mark.xdist_group("train")
# 4 frames of 32x32 pixels -> 8x8 latents with the tiny VAE; a one-level tiny UNet with one
# ResNet (+ spatial transformer + motion module) per block: what compiles fastest.
COMMON = [
    "model=tiny", "dtype=f32", "seed=0", "optim.learning_rate=1e-3", "data.source=synthetic",
    "data.num_examples=16", "data.synthetic_size=32", "data.synthetic_frames=8",
    "data.sample_size=32", "data.sample_stride=2", "data.sample_n_frames=4", "data.num_shards=2",
    "data.num_threads=1", "log.progress=false", "log.tensorboard=false",
    "model_overrides={unet: {layers_per_block: 1, block_out_channels: [32], "
    "cross_attention_levels: [true]}}",
    "compiler_options={xla_backend_optimization_level: 0}",   # halves CPU compile time
]


def config(out, *extra):
  return load_config(None, COMMON + [f"output_dir={out}", f"steps={STEPS}", "batch_size=2",
                                     "checkpoint.every=2", "export.at_end=false", *extra])


def loaded_frozen(tr) -> dict:
  """The stage's frozen weights as loaded afresh from its model source (not the trainer's copy)."""
  return S.split_model(tr.cfg, S.model_tree(tr.cfg, S.load_base(tr.cfg)))[1]


RUN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax
    if len(sys.argv) > 3:
      jax.distributed.initialize(coordinator_address=sys.argv[3], num_processes=2,
                                 process_id=int(sys.argv[4]))
    from adiff_jax.train.config import load_config
    from adiff_jax.train.loop import Trainer
    tr = Trainer(load_config(None, json.loads(sys.argv[1])))
    hist = tr.run()
    tr.close()
    if jax.process_index() == 0:
      print("LOSSES", json.dumps([h["loss"] for h in hist]), jax.device_count(), jax.process_count())
""")


def _env(devices=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _overrides(out, *extra):
  return json.dumps(COMMON + [f"output_dir={out}", f"steps={STEPS}", "checkpoint.every=2",
                              "export.at_end=false", *extra])


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def background(tmp_path_factory):
  """Starts the 8-device and the two-process runs right away; tests collect them later."""
  d = tmp_path_factory.mktemp("bg")
  procs = {}
  # 8 devices: data=2 x frames=4, 1 clip per data replica => the same global batch of 2,
  # with FSDP of the trainable weights and optimizer state.
  procs["mesh8"] = [subprocess.Popen(
      [sys.executable, "-c", RUN_SCRIPT, _overrides(d / "m8", "batch_size=1", "mesh.frames=4",
                                                     "mesh.fsdp=true"), "x"],
      env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
  addr = f"127.0.0.1:{_free_port()}"
  procs["two"] = [subprocess.Popen(
      [sys.executable, "-c", RUN_SCRIPT, _overrides(d / "mp", "batch_size=1"), "x", addr, str(i)],
      env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  yield procs
  for ps in procs.values():
    for p in ps:
      if p.poll() is None:
        p.kill()


def _collect(procs, timeout=600):
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    outs.append(out)
  line = [l for o in outs for l in o.splitlines() if l.startswith("LOSSES")][0]
  losses, devices, processes = re.match(r"LOSSES (\[.*\]) (\d+) (\d+)", line).groups()
  return json.loads(losses), (int(devices), int(processes))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, background):
  """The reference: STEPS steps on one device, checkpoints every 2 steps, exported at the end."""
  out = tmp_path_factory.mktemp("straight")
  tr = Trainer(config(out, "export.at_end=true"), export_files=export_stage)   # as train.py
  initial = loaded_frozen(tr)
  hist = tr.run()
  yield tr, hist, initial, out
  tr.close()


def test_frozen_params_bit_identical(straight):
  tr, hist, initial, out = straight
  assert len(hist) == STEPS and all(h["finite"] for h in hist)
  fresh = S.model_tree(tr.cfg, S.load_base(tr.cfg))    # the same random init, made again
  _, fresh_frozen = S.split_model(tr.cfg, fresh)
  trained = flatten(tr.trained_tree())
  for path, v in flatten(fresh_frozen).items():
    assert np.array_equal(np.asarray(trained[path]), v), path     # bitwise
  for path, v in flatten(jax.tree.map(np.asarray, tr.frozen)).items():
    assert np.array_equal(v, flatten(initial)[path]), path
  # Trainable leaves are exactly the motion modules, and they moved.
  mm = {k: v for k, v in flatten(fresh).items() if is_motion_module(k)}
  assert set(flatten(tr.state["params"])) == set(mm)
  assert any(not np.array_equal(trained[k], v) for k, v in mm.items())
  # The exported model dir: base bit-identical, motion module = trained.
  items, meta = model_dir.load_items(str(out / "export" / "model"))
  for k, v in flatten(items["unet"]).items():
    assert np.array_equal(v, flatten(fresh)["unet/" + k]), k
  for k, v in flatten(items["motion_module"]).items():
    assert np.array_equal(v, trained["unet/" + k]), k
  assert os.path.isfile(out / "export" / "motion_module.safetensors")
  assert model_dir.config_of(meta, "motion_module") == tr.base.config.motion


def test_exported_motion_module_round_trips(straight):
  from convert_weights import motion_module_files as motion
  tr, _, _, out = straight
  tree, cfg, _ = motion.load_motion_module(str(out / "export" / "motion_module.safetensors"),
                                           num_heads=2, norm_groups=8)
  trained = flatten(tr.trained_tree())
  for k, v in flatten(tree).items():
    np.testing.assert_array_equal(v, trained["unet/" + k])


def test_resume_equals_uninterrupted(straight, tmp_path):
  _, hist, _, _ = straight
  a = Trainer(config(tmp_path))
  first = a.run(STEPS // 2)          # stops after the checkpoint at step 2
  a.close()
  b = Trainer(config(tmp_path))      # a new trainer: restores weights, optimizer, step, data
  assert b.step == STEPS // 2
  second = b.run()
  b.close()
  assert [h["loss"] for h in first + second] == [h["loss"] for h in hist]


def _eval_losses(tr, batch, keys=(10**6, 10**6 + 1, 10**6 + 2)):
  """Loss of the current weights on a fixed batch at fixed noise (the step's key depends only
  on the step counter), through the compiled train step on a copy of the state."""
  losses = []
  for k in keys:
    st = jax.tree.map(lambda x: x.copy(), tr.state)
    st["step"] = jax.device_put(np.int32(k), tr.state_sh["step"])
    with jax.set_mesh(tr.mesh):
      _, m = tr.compiled_step(batch)(st, tr.frozen, batch)
    losses.append(float(m["loss"]))
  return np.mean(losses)


def test_loss_decreases_on_synthetic(tmp_path):
  tr = Trainer(config(tmp_path, "data.num_examples=2", "data.empty_text_prob=0",
                      "data.random_flip=false", "steps=30", "checkpoint.every=0"))
  batch = tr.global_batch_arrays(next(S_batches(tr)))
  before = _eval_losses(tr, batch)
  tr.run()
  after = _eval_losses(tr, batch)
  tr.close()
  print("loss before/after", before, after)
  assert after < 0.8 * before, (before, after)


def S_batches(tr):
  """A fresh iterator over the same data (the trainer's own iterator stays untouched)."""
  from adiff_jax.train.inputs import HostBatches
  return HostBatches(tr.cfg, tr.global_batch, 0, 1)


def test_nonfinite_skip_and_stop(tmp_path):
  tr = Trainer(config(tmp_path / "skip", "steps=3", "checkpoint.every=0", "export.at_end=false"))
  real = tr.batches

  class Poisoned:                 # step 2's clip is NaN
    n = 0
    def __next__(self):
      b = next(real)
      Poisoned.n += 1
      if Poisoned.n == 2:
        b = dict(b, video=np.full_like(b["video"], np.nan))
      return b
    def __getattr__(self, k):
      return getattr(real, k)

  tr.batches = Poisoned()
  tr.run(1)
  after1 = jax.tree.map(np.array, tr.state["params"])
  hist = tr.run(1)
  assert tr.skipped == [2] and not hist[-1]["finite"]
  after2 = jax.tree.map(np.array, tr.state["params"])
  jax.tree.map(np.testing.assert_array_equal, after1, after2)     # update skipped
  hist = tr.run()
  assert hist[-1]["finite"] and np.isfinite(hist[-1]["loss"])
  assert tr.ckpt.latest_step() == 3
  tr.close()

  tr = Trainer(config(tmp_path / "stop", "on_nonfinite=stop", "checkpoint.every=1"))
  real = tr.batches
  Poisoned.n = 0
  tr.batches = Poisoned()
  with pytest.raises(NonFiniteLoss, match="step 2"):
    tr.run()
  tr.ckpt.wait()
  assert tr.ckpt.latest_step() == 1        # nothing saved at or after the bad step
  tr.close()


def test_corrupt_and_short_videos_skipped(tmp_path):
  import csv
  from adiff_jax.data import webvid
  d = tmp_path / "videos"
  d.mkdir()
  frames = np.full((12, 40, 48, 3), 40, np.uint8)
  for i in range(12):
    frames[i, 10:26, 2 + 2 * i:18 + 2 * i] = (220, 40, 40)
  webvid.write_video(str(d / "good0.mp4"), frames)
  webvid.write_video(str(d / "good1.mp4"), frames[:, :, ::-1])
  webvid.write_video(str(d / "short.mp4"), frames[:2])
  (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
  with open(d / "index.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["videoid", "name", "page_dir"])
    w.writerows([("good0", "a red square moving right", "p"), ("short", "short", "p"),
                 ("corrupt", "broken", "p"), ("good1", "a red square moving left", "p"),
                 ("missing", "gone", "p"), ("good0", "again", "p")])
  tr = Trainer(config(tmp_path / "run", "data.source=webvid", f"data.csv_path={d / 'index.csv'}",
                      f"data.video_folder={d}", "steps=3", "checkpoint.every=0", "data.num_shards=1"))
  hist = tr.run()
  counts = tr.batches.counts
  tr.close()
  assert all(np.isfinite(h["loss"]) for h in hist)
  assert counts["unreadable"] >= 2 and counts["too_short"] >= 1, counts


@pytest.mark.parametrize("stage", ["motion_lora", "domain_adapter"])
def test_lora_stages_train_only_lora(stage, straight, tmp_path):
  from convert_weights import lora_files
  # On top of the trained motion module of `straight` (a fresh one has a zero output
  # projection, which would give a MotionLoRA zero gradients), loaded from its model dir.
  base = straight[3] / "export" / "model"
  tr = Trainer(config(tmp_path, f"stage={stage}", "lora_rank=4", "lora_alpha=0.5", "steps=2",
                      "checkpoint.every=0", "export.at_end=true", f"model={base}"),
               export_files=export_stage)
  initial = loaded_frozen(tr)
  tr.run()
  trained = flatten(tr.trained_tree())
  trainable = set(flatten(tr.state["params"]))
  assert trainable and all(k.startswith("lora/") and k.endswith(("/down", "/up")) for k in trainable)
  filt = S.LORA_STAGES[stage]
  assert all(filt(k[len("lora/"):].rsplit("/", 1)[0]) for k in trainable)
  for k, v in flatten(initial).items():          # everything else, LoRA scales included
    assert np.array_equal(trained[k], v), k
  assert all(np.abs(v).max() > 0 for k, v in trained.items() if k.endswith("/up"))  # moved off 0
  if stage == "domain_adapter":
    assert not any("motion_modules_" in k for k in trained)   # the plain image UNet, on frames
  # Exported in the original processor-LoRA format; reads back to the trained weights.
  path = tmp_path / "export" / f"{stage}.safetensors"
  loaded = flatten(lora_files.load_motion_lora(str(path), alpha=0.5) if stage == "motion_lora"
                  else lora_files.load_domain_adapter(str(path), 0.5))
  for k, v in loaded.items():
    np.testing.assert_allclose(v, trained["lora/" + k], rtol=0, atol=0)
  tr.close()


def test_sharded_8_devices_equals_single_device(straight, background):
  _, hist, _, _ = straight
  losses, layout = _collect(background["mesh8"])
  assert layout == (8, 1), layout
  # Same first loss (same weights, data, noise); later steps within float reassociation
  # (Adam's normalisation amplifies last-bit gradient differences a little).
  np.testing.assert_allclose(losses[0], hist[0]["loss"], rtol=1e-5)
  np.testing.assert_allclose(losses, [h["loss"] for h in hist], rtol=2e-4)


def test_two_process_distributed_equals_one_process(straight, background):
  _, hist, _, _ = straight
  losses, layout = _collect(background["two"])
  assert layout == (2, 2), layout
  # Same first loss (same weights, data, noise); later steps within float reassociation
  # (Adam's normalisation amplifies last-bit gradient differences a little).
  np.testing.assert_allclose(losses[0], hist[0]["loss"], rtol=1e-5)
  np.testing.assert_allclose(losses, [h["loss"] for h in hist], rtol=2e-4)
