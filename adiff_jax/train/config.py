"""Training configuration: frozen dataclasses, loaded from YAML with `key=value` overrides.

Every field has a default, so a YAML file only lists what differs. Nested sections are
dataclasses; dotted keys on the command line reach into them (`optim.learning_rate=3e-4`).
Unknown keys are errors, so a typo never silently trains with a default.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

import yaml

from adiff_jax.config_io import from_dict, to_dict  # noqa: F401  (to_dict: part of this API)
from adiff_jax.errors import InputError

STAGES = ("motion_module", "domain_adapter", "motion_lora", "image", "vae")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where clips come from and how they are sampled (see docs/data.md)."""
  source: str = "synthetic"            # synthetic | webvid | tfds | precomputed
  csv_path: Optional[str] = None       # webvid: CSV with videoid, name, page_dir
  video_folder: Optional[str] = None   # webvid: folder of {videoid}.mp4
  use_page_dir: bool = False
  tfds_dir: Optional[str] = None       # tfds: ArrayRecord dataset folder
  precomputed_dir: Optional[str] = None  # precomputed: output of `python -m adiff_jax.train.precompute`
  num_examples: int = 10_000           # synthetic: dataset size
  synthetic_size: int = 64             # synthetic: rendered frame size
  synthetic_frames: int = 16           # synthetic: rendered clip length
  synthetic_still: bool = False        # synthetic: still images captioned "a red circle"
  synthetic_background: Optional[int] = None  # synthetic: one flat grey level (0..255) instead of random backgrounds
  synthetic_trail: bool = False        # synthetic: moving objects draw a fading trail (direction visible in one frame)
  synthetic_travel: tuple[float, float] = (0.3, 0.5)  # synthetic: first-to-last-frame distance range, in frame sizes
  synthetic_directions: tuple[str, ...] = ("left", "right", "up", "down")  # synthetic: directions drawn from (one: a MotionLoRA set, never flipped)
  sample_size: int = 256
  sample_stride: int = 4
  sample_n_frames: int = 16
  single_frame: bool = False           # one random frame per example (image / domain adapter)
  first_frame: bool = False            # single-frame stages: the clip's first frame, not a random one
  min_frames: Optional[int] = None
  random_flip: bool = True
  empty_text_prob: float = 0.1         # official cfg_random_null_text_ratio
  num_shards: Optional[int] = None     # data shards (None: one per process); fixed => any host count reads the same batches
  worker_count: int = 0
  num_threads: int = 2
  seed: Optional[int] = None           # None: the run's seed


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with global-norm clipping (official: lr 1e-4, wd 1e-2, betas 0.9/0.999, eps 1e-8, clip 1)."""
  learning_rate: float = 1e-4
  weight_decay: float = 1e-2
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0               # <= 0: no clipping
  warmup_steps: int = 0                # linear warm-up from 0 (official: none)
  schedule: str = "constant"           # after warm-up: constant (official) | cosine
  end_learning_rate: float = 0.0       # cosine: the value it decays to
  decay_steps: int = 0                 # cosine: steps from warm-up end to end_learning_rate (0: to the run's last step)

  def __post_init__(self):
    if self.schedule not in ("constant", "cosine"):
      raise InputError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  frames: int = 1                      # devices along the frames axis; the rest is `data`
  fsdp: bool = False                   # shard trainable weights + optimizer state over `data`


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 1000                    # steps between checkpoints (0: only at the end)
  keep: int = 3                        # keep the last N
  resume: bool = True                  # continue from the latest checkpoint in output_dir


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every: int = 10                      # JSONL / TensorBoard / progress-bar refresh interval
  tensorboard: bool = True             # when a SummaryWriter is importable
  progress: bool = True


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
  every: int = 0                       # steps between validation GIFs (0: never, -1: at the end only)
  prompts: tuple[str, ...] = ("a red circle moving left",)
  frames: int = 16
  height: int = 256
  width: int = 256
  steps: int = 25
  guidance_scale: float = 7.5
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  at_end: bool = True
  format: str = "safetensors"          # safetensors | ckpt (original PyTorch format)
  model_dir: bool = True               # also an Orbax model dir that `sample.py --ckpt` loads


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  stage: str = "motion_module"
  model: str = "tiny"                  # "tiny" (random init) or an Orbax model dir
  model_overrides: dict = dataclasses.field(default_factory=dict)  # {unet|text_encoder|vae: {field: v}} for "tiny"
  motion_preset: str = "v3"            # motion module created when the base has none
  motion_overrides: dict = dataclasses.field(default_factory=dict)
  lora_rank: int = 64                  # motion_lora / domain_adapter
  lora_alpha: float = 1.0
  output_dir: str = "runs/train"
  seed: int = 0
  steps: int = 1000
  batch_size: int = 4                  # per data-parallel replica (one index of the `data` axis)
  dtype: str = "bf16"                  # compute dtype; trainable weights and optimizer stay f32
  remat: bool = False
  attention_impl: Optional[str] = None
  vae_chunk: int = 0                   # frames per VAE encoder call (0: all at once)
  vae_kl_weight: float = 1e-3          # vae stage: per-element KL weight
  noise_offset: float = 0.0            # diffusion stages: + offset * N(0,1) per (sample, channel), shared over frames and pixels
  loss_weighting: str = "none"         # diffusion stages: none (plain MSE, official) | min_snr (uses snr_gamma) | v (1 / acp_t)
  snr_gamma: float = 5.0               # loss_weighting=min_snr: the gamma of Min-SNR-gamma
  min_timestep: int = 0                # diffusion stages: t ~ U{min_timestep..999} (official: 0)
  on_nonfinite: str = "skip"           # skip | stop
  compiler_options: dict = dataclasses.field(default_factory=dict)  # XLA options for the step
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  log: LogConfig = LogConfig()
  validation: ValidationConfig = ValidationConfig()
  export: ExportConfig = ExportConfig()

  def __post_init__(self):
    if self.stage not in STAGES:
      raise InputError(f"unknown stage {self.stage!r}; choose from {', '.join(STAGES)}")
    if self.on_nonfinite not in ("skip", "stop"):
      raise InputError(f"on_nonfinite must be skip or stop, got {self.on_nonfinite!r}")
    if self.dtype not in ("f32", "bf16"):
      raise InputError(f"dtype must be f32 or bf16, got {self.dtype!r}")
    if self.export.format not in ("safetensors", "ckpt"):
      raise InputError(f"export.format must be safetensors or ckpt, got {self.export.format!r}")
    if self.steps < 1 or self.batch_size < 1:
      raise InputError("steps and batch_size must be >= 1")
    if self.loss_weighting not in ("none", "min_snr", "v"):
      raise InputError(f"loss_weighting must be none, min_snr or v, got {self.loss_weighting!r}")
    if self.loss_weighting == "min_snr" and self.snr_gamma <= 0:
      raise InputError(f"loss_weighting=min_snr needs snr_gamma > 0, got {self.snr_gamma}")

  @property
  def data_seed(self) -> int:
    return self.seed if self.data.seed is None else self.data.seed


def apply_override(d: dict, item: str) -> None:
  """'a.b.c=value' into the nested dict d; the value is parsed as YAML (numbers, lists, null)."""
  if "=" not in item:
    raise InputError(f"override {item!r} is not key=value")
  key, value = item.split("=", 1)
  parts = key.strip().split(".")
  node = d
  for p in parts[:-1]:
    node = node.setdefault(p, {})
    if not isinstance(node, dict):
      raise InputError(f"override {item!r}: {p} is not a section")
  node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def load_config(path: Optional[str] = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
  """YAML file (optional) + `key=value` overrides -> TrainConfig."""
  d: dict[str, Any] = {}
  if path:
    try:
      with open(path) as f:
        d = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
      raise InputError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
  for item in overrides:
    apply_override(d, item)
  return from_dict(TrainConfig, d, where=path or "config")
