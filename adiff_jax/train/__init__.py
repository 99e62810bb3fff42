"""Training: configs, train state, the jitted step, checkpoints, logging, multi-host setup.

`python train.py --config configs/training/NAME.yaml [key=value ...]` drives it; see
docs/training.md.
"""
