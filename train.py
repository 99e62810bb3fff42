"""Train AnimateDiff motion modules, MotionLoRAs, domain adapters (and the tiny base model).

  python train.py --config configs/training/tiny.yaml                 # CPU, minutes
  python train.py --config configs/training/motion_module.yaml model=/ckpt/sd15 \\
      data.csv_path=results_2M_train.csv data.video_folder=videos/
  python train.py --config configs/training/tiny.yaml steps=50 optim.learning_rate=3e-4

Overrides are `key=value` with dotted keys into the config sections (see docs/training.md).
Multi-host: automatic on Cloud TPU; elsewhere pass --coordinator-address, --num-processes
and --process-id on every process.
"""
from __future__ import annotations

import argparse
import sys

from adiff_jax.errors import InputError, run_cli


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", help="training config YAML (configs/training/*.yaml)")
  ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
  ap.add_argument("--coordinator-address", help="host:port of process 0 (multi-process, non-TPU)")
  ap.add_argument("--num-processes", type=int)
  ap.add_argument("--process-id", type=int)
  ap.add_argument("--no-auto-distributed", action="store_true",
                  help="do not call jax.distributed.initialize() on a detected TPU VM")
  ap.add_argument("--export-only", action="store_true",
                  help="restore the latest checkpoint of output_dir and export it, without training")
  ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  return ap.parse_args(argv)


def main(argv=None) -> int:
  from adiff_jax import host_memory
  host_memory.keep_freed_memory()      # before JAX starts its threads (XLA:CPU steps: no re-faulting)
  args = parse_args(argv)
  from adiff_jax.train.config import load_config, to_dict
  cfg = load_config(args.config, args.overrides)
  if args.print_config:
    import yaml
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0

  # Before anything touches a JAX backend.
  from adiff_jax.train import distributed
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                         auto=not args.no_auto_distributed)
  import jax
  from adiff_jax.train.loop import NonFiniteLoss, Trainer

  if jax.process_index() == 0:
    print(f"stage {cfg.stage}: {jax.process_count()} process(es), {jax.device_count()} "
          f"{jax.devices()[0].device_kind} device(s); output {cfg.output_dir}")
  from convert_weights.convert import export_stage
  trainer = Trainer(cfg, export_files=export_stage)
  try:
    if args.export_only:
      if trainer.ckpt.latest_step() is None:
        raise InputError(f"no checkpoint in {trainer.ckpt.directory} to export")
      trainer.export()
      return 0
    if jax.process_index() == 0:
      print(f"global batch {trainer.global_batch} on mesh {dict(trainer.mesh.shape)}; "
            f"starting at step {trainer.step} of {cfg.steps}")
    trainer.run()
  except NonFiniteLoss as e:
    raise InputError(f"{e}") from None
  finally:
    trainer.close()
  if trainer.skipped and jax.process_index() == 0:
    print(f"{len(trainer.skipped)} step(s) skipped for non-finite loss: {trainer.skipped[:20]}")
  return 0


if __name__ == "__main__":
  # Bad configs, files and sizes print one `error:` line and exit 2; bugs keep their traceback.
  sys.exit(run_cli(main))
