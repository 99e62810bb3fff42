"""The training loop: builds model, state, data and the compiled step; runs, checkpoints,
resumes, validates and exports. One `Trainer` per run; every process of a multi-host run
executes the same calls (collectives), only process 0 writes logs, samples and exports."""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from adiff_jax import host_memory
from adiff_jax.sharding import DATA, make_mesh
from adiff_jax.train import distributed, export as export_lib
from adiff_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from adiff_jax.train.config import TrainConfig, to_dict
from adiff_jax.train.inputs import HostBatches
from adiff_jax.train.metrics_log import MetricsLogger, compiled_flops, device_peak_flops, mfu
from adiff_jax.params import merge
from adiff_jax.train.state import (IMAGE_STAGES, batch_spec, init_state, load_base,
                                   model_tree, split_model, state_shardings)
from adiff_jax.train.step import make_spec, make_train_step
from adiff_jax.errors import InputError

Pytree = Any


class NonFiniteLoss(RuntimeError):
  pass


def put(tree: Pytree, shardings: Pytree) -> Pytree:
  """Host numpy -> global jax.Arrays; each process supplies only its addressable pieces."""
  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
  """A replicated (possibly multi-process) array -> numpy, from this process's own copy."""
  return np.asarray(x.addressable_data(0))


class Trainer:
  def __init__(self, cfg: TrainConfig, *, source=None, log: bool = True, export_files=None):
    """export_files: writes the stage's PyTorch files from the exported model dir
    (train.py passes `convert_weights.convert.export_stage`; see train/export.py)."""
    self.cfg = cfg
    self.export_files = export_files
    self.is_main = jax.process_index() == 0
    self.mesh = make_mesh(frames=cfg.mesh.frames)
    self.global_batch = cfg.batch_size * self.mesh.shape[DATA]
    self.replicated = NamedSharding(self.mesh, P())
    base = load_base(cfg)
    trainable, frozen = split_model(cfg, model_tree(cfg, base))
    # Only the configs and metadata are kept: the weights live on the devices from here on (the
    # frozen ones are never an output of the step, so exports read them back from there).
    self.base = dataclasses.replace(base, params={})
    self.spec = make_spec(cfg, self.base.config)

    init = functools.partial(init_state, self.spec.optim)
    abstract = jax.eval_shape(init, trainable)
    self.state_sh = state_shardings(self.mesh, abstract, cfg.mesh.fsdp)
    self.frozen_sh = jax.tree.map(lambda _: self.replicated, frozen)
    with jax.set_mesh(self.mesh):
      self.frozen = put(frozen, self.frozen_sh)
      self.state = jax.jit(init, out_shardings=self.state_sh)(put(trainable, self.state_sh["params"]))
    del base, trainable, frozen
    host_memory.release_freed_memory()      # the numpy copies' pages (no-op off glibc)
    self.batches = HostBatches(cfg, self.global_batch, jax.process_index(), jax.process_count(),
                               source=source)
    self.ckpt = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), cfg.checkpoint.keep)
    self.logger = MetricsLogger(cfg.output_dir, cfg.steps, progress=cfg.log.progress,
                                tensorboard=cfg.log.tensorboard, enabled=log and self.is_main)
    self.history: list[dict] = []
    self.skipped: list[int] = []
    self._step_fn = None
    self.flops_per_step: Optional[float] = None
    self.peak = device_peak_flops()
    if cfg.checkpoint.resume and self.ckpt.latest_step() is not None:
      self.restore(self.ckpt.latest_step())

  # -- state ------------------------------------------------------------------------------
  @property
  def step(self) -> int:
    return int(to_host(self.state["step"]))

  def restore(self, step: int) -> None:
    abstract = abstract_with_shardings(self.state, self.state_sh)
    state, data, saved_cfg = self.ckpt.restore(step, abstract)
    self.state = state
    self.batches.set_state(data["shards"])
    if saved_cfg.get("stage") != self.cfg.stage:
      raise InputError(f"checkpoint in {self.ckpt.directory} is from stage {saved_cfg.get('stage')}, "
                       f"not {self.cfg.stage}")
    self.logger.message(f"resumed from step {step} ({self.ckpt.directory})")

  def save(self) -> None:
    step = self.step
    # A skipped update keeps the old weights, so they are finite; check anyway, never save NaN.
    finite = jax.jit(lambda p: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(p)])),
                     out_shardings=self.replicated)(self.state["params"])
    if not bool(to_host(finite)):
      raise NonFiniteLoss(f"step {step}: trainable weights are not finite; not saving a checkpoint")
    shards = {}
    for part in distributed.allgather_json(self.batches.get_state()):
      shards.update(part)
    self.ckpt.save(step, self.state, {"shards": shards}, to_dict(self.cfg))

  def trained_tree(self) -> dict:
    """Full model tree on the host: gathered trainable weights + the frozen ones (replicated,
    never modified: each process reads its own copy)."""
    params = jax.jit(lambda p: p, out_shardings=self.replicated)(self.state["params"])
    return merge(jax.tree.map(to_host, params), jax.tree.map(to_host, self.frozen))

  # -- step --------------------------------------------------------------------------------
  def global_batch_arrays(self, batch: dict) -> dict:
    out = {}
    for k in ("video", "ids", "latent_mean", "latent_std", "text_emb"):
      if k not in batch:
        continue
      local = np.asarray(batch[k])
      shape = (self.global_batch,) + local.shape[1:]
      sharding = NamedSharding(self.mesh, batch_spec(self.mesh, shape))
      out[k] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out

  def compiled_step(self, batch: dict):
    if self._step_fn is None:
      batch_sh = {k: v.sharding for k, v in batch.items()}
      self._step_fn, jitted = make_train_step(self.spec, self.state_sh, self.frozen_sh, batch_sh,
                                              self.replicated, self.cfg.compiler_options)
      with jax.set_mesh(self.mesh):
        compiled = jitted.lower(self.spec, self.state, self.frozen, batch).compile()
      if self.peak is not None:   # FLOPs per step, for MFU: only where a peak is known
        self.flops_per_step = compiled_flops(compiled)
      # The compiler's freed working memory (GBs at SD size) would otherwise stay resident beside
      # the step's buffers (host_memory.keep_freed_memory); the jitted step reuses this compile.
      host_memory.release_freed_memory()
    return self._step_fn

  def step_once(self, host_batch: dict):
    batch = self.global_batch_arrays(host_batch)
    fn = self.compiled_step(batch)
    with jax.set_mesh(self.mesh):
      self.state, metrics = fn(self.state, self.frozen, batch)
    return metrics

  # -- loop --------------------------------------------------------------------------------
  def _finish(self, step: int, metrics: dict, seconds: float) -> None:
    m = {k: to_host(v).item() for k, v in metrics.items()}
    finite = bool(m.pop("finite"))
    m["samples_per_s"] = self.global_batch / seconds if seconds > 0 else 0.0
    m["step_s"] = seconds
    m["mfu"] = mfu(self.flops_per_step, seconds, self.peak)
    self.history.append({"step": step, **m, "finite": finite})
    if not finite:
      self.skipped.append(step)
      msg = (f"step {step}: non-finite loss {m['loss']} / grad norm {m['grad_norm']} "
             f"(data counts {self.batches.counts})")
      if self.cfg.on_nonfinite == "stop":
        self.logger.message(msg + "; stopping (on_nonfinite=stop). The weights and the last "
                            "checkpoint are from before this step.")
        raise NonFiniteLoss(msg + ": stopped (on_nonfinite=stop); no checkpoint was written for "
                            "this step. Lower optim.learning_rate, use dtype=f32, or check the data.")
      self.logger.message(msg + "; update skipped (on_nonfinite=skip)")
    every = max(1, self.cfg.log.every)
    self.logger.log(step, {**m, **self.batches.counts}, write=step % every == 0 or step == 1)

  def run(self, steps: Optional[int] = None) -> list[dict]:
    """Train until cfg.steps (or `steps` more steps); checkpoints, validates, exports at the end."""
    cfg = self.cfg
    step = self.step
    target = cfg.steps if steps is None else min(cfg.steps, step + steps)
    pending = None
    last = time.perf_counter()
    try:
      while step < target:
        metrics = self.step_once(next(self.batches))
        step += 1
        if pending is not None:   # fetch the previous step's metrics while this one runs
          now = time.perf_counter()
          self._finish(*pending, now - last)
          last = now
        pending = (step, metrics)
        ck, val = cfg.checkpoint.every, cfg.validation.every
        due_ckpt = ck > 0 and step % ck == 0
        due_val = val > 0 and step % val == 0
        if due_ckpt or due_val or step == target:
          jax.block_until_ready(metrics)
          now = time.perf_counter()
          self._finish(*pending, now - last)
          last, pending = now, None
        if due_ckpt or step == cfg.steps:
          self.save()
        if due_val or (step == cfg.steps and val != 0):
          try:
            self.validate(step)
          except Exception as e:  # a sampling problem must not end a long training run
            self.logger.message(f"step {step}: validation failed: {type(e).__name__}: {e}")
          last = time.perf_counter()
    finally:
      self.ckpt.wait()
    if step == cfg.steps and cfg.export.at_end:
      self.export()
    return self.history

  # -- outputs -----------------------------------------------------------------------------
  def export(self) -> list[str]:
    tree = self.trained_tree()
    step = self.step
    if self.cfg.stage == "vae":
      self.base.config = dataclasses.replace(
          self.base.config, vae=dataclasses.replace(self.base.config.vae,
                                                    scaling_factor=self.latent_scale(tree)))
    written = []
    if self.is_main:
      written = export_lib.export(self.cfg, self.base, tree, os.path.join(self.cfg.output_dir, "export"),
                                  step, log=self.logger.message, export_files=self.export_files)
    distributed.sync("export")
    return written

  def latent_scale(self, tree: dict, batches: int = 4) -> float:
    """1 / std of the trained VAE's latents on training frames (how SD's 0.18215 was chosen)."""
    from adiff_jax.vae import AutoencoderKL
    vae = AutoencoderKL(self.base.config.vae)
    enc = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode).mean)
    zs = []
    for _ in range(batches):
      v = next(self.batches)["video"]
      zs.append(np.asarray(enc(tree["vae"], v.reshape((-1,) + v.shape[2:]))))
    scale = float(1.0 / np.std(np.concatenate(zs)))
    self.logger.message(f"VAE latent scaling factor: {scale:.5f} (1 / latent std)")
    return scale

  def validate(self, step: int) -> Optional[str]:
    """Sample the validation prompts with the current weights; writes samples/step_N.gif."""
    v = self.cfg.validation
    if self.cfg.stage == "vae":
      return None
    tree = self.trained_tree()
    if not self.is_main:
      return None
    from adiff_jax.sampling import Pipeline, SamplingConfig
    from adiff_jax.video_io import grid, save_gif, to_uint8
    lora = tree.pop("lora", None)
    image = self.cfg.stage in IMAGE_STAGES
    model = dataclasses.replace(self.base.config, motion=None) if image else self.base.config
    pipe = Pipeline(model, tree, lora=lora, dtype=self.cfg.dtype)
    sc = SamplingConfig(frames=1 if image else v.frames, height=v.height, width=v.width,
                        steps=v.steps, guidance_scale=v.guidance_scale)
    prompts = list(v.prompts)
    frames = pipe(prompts, seeds=[v.seed + i for i in range(len(prompts))], cfg=sc, progress=False)
    path = os.path.join(self.cfg.output_dir, "samples", f"step_{step:07d}.gif")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_gif(grid(list(to_uint8(frames))), path)
    self.logger.message(f"validation samples: {path}")
    return path

  def close(self) -> None:
    self.ckpt.close()
    self.logger.close()
