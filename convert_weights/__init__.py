"""Converters between PyTorch checkpoints (LDM, diffusers, official AnimateDiff) and Orbax.

Library API (see docs/converters.md):
  io.load_torch_file / io.save_torch_file                PyTorch files <-> {key: numpy}
  base.load_base_model / base.export_ldm                 SD1.5 UNet + VAE + CLIP
  motion.load_motion_module / motion.export_motion_module
  lora_files.load_motion_lora / load_domain_adapter / export_lora / merge_kohya_lora
  orbax_io.save_model_dir / load_model_dir / *_config_from_meta
  pipeline.to_orbax / pipeline.to_torch                  what the CLI runs
"""
from convert_weights.errors import ConversionError  # noqa: F401
