"""The model a stage trains: base weights, which leaves are trainable, optimizer, shardings.

All weights of a run live in one nested dict, the *model tree*:

    {"unet": ..., "text_encoder": ..., "vae": ..., ["lora": ...]}

A stage is a predicate over flattened paths ("unet/down_blocks_0/motion_modules_0/...") that
picks the trainable leaves. The tree is split into two pytrees once: `trainable` (f32, gets
gradients and optimizer state, checkpointed) and `frozen` (never an output of the step, so it
stays bit-identical). The step merges them back inside the traced function.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adiff_jax import lora as lora_lib, model_dir
from adiff_jax.errors import InputError
from adiff_jax.model import ModelConfig, new_motion_module, random_params
from adiff_jax.motion_module import (MotionModuleConfig, is_motion_module, merge_motion_module,
                                     split_motion_module)
from adiff_jax.params import flatten, split
from adiff_jax.sharding import DATA
from adiff_jax.train.config import OptimConfig, TrainConfig

Pytree = Any

# Stages that see single frames through the plain image UNet (no motion modules).
IMAGE_STAGES = ("domain_adapter", "image", "vae")
LORA_STAGES = {"motion_lora": lora_lib.motion_lora_filter,
               "domain_adapter": lora_lib.domain_adapter_filter}


def trainable_filter(stage: str) -> Callable[[str], bool]:
  """Path predicate of the leaves a stage trains."""
  if stage == "motion_module":
    return lambda p: p.startswith("unet/") and is_motion_module(p)
  if stage in LORA_STAGES:
    # A LoRA's per-rank `scale` carries its alpha: a constant, not a weight.
    return lambda p: p.startswith("lora/") and not p.endswith("/scale")
  if stage == "image":
    return lambda p: p.startswith(("unet/", "text_encoder/"))
  if stage == "vae":
    return lambda p: p.startswith("vae/")
  raise InputError(f"unknown stage {stage!r}")


# ----------------------------------------------------------------------------- base model


def _replace(cfg, overrides: Optional[dict]):
  if not overrides:
    return cfg
  fields = {f.name: f for f in dataclasses.fields(cfg)}
  bad = sorted(set(overrides) - set(fields))
  if bad:
    raise InputError(f"{type(cfg).__name__} has no field(s) {bad}")
  return dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in overrides.items()})


def motion_config(cfg: TrainConfig) -> MotionModuleConfig:
  return MotionModuleConfig.preset(cfg.motion_preset, **{
      k: tuple(v) if isinstance(v, list) else v for k, v in cfg.motion_overrides.items()})


@dataclasses.dataclass
class Base:
  """The loaded base model: configs, weights (numpy) and where they came from."""
  config: ModelConfig              # motion=None for image stages
  params: dict                     # {"unet", "text_encoder", "vae"}
  meta: dict                       # metadata of the source model dir ({} for "tiny")
  motion_is_new: bool = False      # the motion module was created here (not loaded)


def load_base(cfg: TrainConfig) -> Base:
  """Base weights for a stage: `model: tiny` (builtin random init, `model_overrides` applied)
  or a model dir (convert_weights / a previous stage's export). Motion stages get a fresh
  identity motion module when the base has none; image stages drop it."""
  image = cfg.stage in IMAGE_STAGES
  if cfg.model == "tiny":
    t = ModelConfig.tiny()
    ov = cfg.model_overrides
    bad = sorted(set(ov) - {"unet", "text_encoder", "vae"})
    if bad:
      raise InputError(f"model_overrides: unknown part(s) {bad}; use unet, text_encoder, vae")
    # The tiny motion module: v3 with 2 heads / 8 groups unless the config says otherwise.
    preset = t.motion if cfg.motion_preset == "v3" else MotionModuleConfig.preset(
        cfg.motion_preset, num_heads=2, norm_groups=8)
    motion = None if image else _replace(preset, cfg.motion_overrides)
    mc = ModelConfig(_replace(t.unet, ov.get("unet")), motion, _replace(t.text, ov.get("text_encoder")),
                     _replace(t.vae, ov.get("vae")))
    return Base(mc, random_params(mc, cfg.seed), {}, motion_is_new=motion is not None)

  config, params, _, meta = model_dir.load(cfg.model)   # adapters the base carries stay out
  image_unet, mm = split_motion_module(params["unet"])
  new = False
  if image:
    config = dataclasses.replace(config, motion=None)
  elif config.motion is None:
    config = dataclasses.replace(config, motion=motion_config(cfg))
    mm, new = new_motion_module(config.unet, config.motion, cfg.seed), True
  unet = image_unet if image else merge_motion_module(image_unet, mm)
  return Base(config, dict(params, unet=unet), meta, motion_is_new=new)


def model_tree(cfg: TrainConfig, base: Base) -> dict:
  """The stage's model tree: the base parts, plus a fresh LoRA for LoRA stages."""
  tree = dict(base.params)
  if cfg.stage in LORA_STAGES:
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    lora = lora_lib.init_lora(key, base.params["unet"], cfg.lora_rank, LORA_STAGES[cfg.stage],
                              alpha=cfg.lora_alpha)
    tree["lora"] = jax.tree.map(np.asarray, lora)
  return tree


def split_model(cfg: TrainConfig, tree: dict) -> tuple[Pytree, Pytree]:
  """(trainable as f32, frozen as loaded)."""
  trainable, frozen = split(tree, trainable_filter(cfg.stage))
  if not flatten(trainable):
    raise InputError(f"stage {cfg.stage}: no trainable parameters in the model")
  trainable = jax.tree.map(lambda a: np.asarray(a, np.float32), trainable)
  return trainable, frozen


# ----------------------------------------------------------------------------- optimizer


def resolve_optim(optim: OptimConfig, total_steps: int) -> OptimConfig:
  """Fills a cosine schedule's decay_steps = 0 with what is left of the run after warm-up."""
  if optim.schedule != "cosine" or optim.decay_steps > 0:
    return optim
  decay = total_steps - optim.warmup_steps
  if decay <= 0:
    raise InputError(f"optim.schedule=cosine: steps ({total_steps}) must exceed warmup_steps "
                     f"({optim.warmup_steps}), or set optim.decay_steps")
  return dataclasses.replace(optim, decay_steps=decay)


def learning_rate(optim: OptimConfig):
  """Linear warm-up from 0, then constant or a cosine decay to end_learning_rate (see
  resolve_optim for decay_steps = 0)."""
  if optim.schedule == "cosine":
    if optim.decay_steps <= 0:
      raise InputError("optim.schedule=cosine needs decay_steps > 0 (resolve_optim fills it)")
    return optax.warmup_cosine_decay_schedule(0.0, optim.learning_rate, optim.warmup_steps,
                                              optim.warmup_steps + optim.decay_steps,
                                              optim.end_learning_rate)
  if optim.warmup_steps > 0:
    return optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)
  return optax.constant_schedule(optim.learning_rate)


def make_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
  """AdamW (+ global-norm clipping), as the official torch.optim.AdamW + clip_grad_norm_."""
  adamw = optax.adamw(learning_rate(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay)
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
  return adamw


def init_state(optim: OptimConfig, trainable: Pytree) -> dict:
  """The donated, checkpointed train state: step counter, trainable weights, optimizer state."""
  return {"step": jnp.zeros((), jnp.int32), "params": trainable,
          "opt": make_optimizer(optim).init(trainable)}


# ----------------------------------------------------------------------------- shardings


def fsdp_spec(shape: tuple[int, ...], data: int) -> P:
  """Shard the largest axis divisible by the `data` axis size; replicate small/odd leaves."""
  if data <= 1 or not shape:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % data == 0 and shape[i] >= data:
      spec = [None] * len(shape)
      spec[i] = DATA
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_state: Pytree, fsdp: bool) -> Pytree:
  """Replicated, or FSDP (weights and matching optimizer moments sharded over `data`)."""
  data = mesh.shape[DATA]
  def leaf(x):
    spec = fsdp_spec(tuple(x.shape), data) if fsdp else P()
    return NamedSharding(mesh, spec)
  return jax.tree.map(leaf, abstract_state)


def batch_spec(mesh: Mesh, shape: tuple[int, ...]) -> P:
  """Batch over `data`; frames over `frames` when divisible (single frames stay whole)."""
  names = [DATA, "frames"][: len(shape)]
  spec = []
  for dim, name in zip(shape, names):
    size = mesh.shape[name]
    spec.append(name if dim % size == 0 else None)
  return P(*spec)
