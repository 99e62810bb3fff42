"""Converters between PyTorch checkpoints (LDM, diffusers, official AnimateDiff) and Orbax."""
