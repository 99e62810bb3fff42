"""Converters between PyTorch checkpoints (LDM, diffusers, official AnimateDiff) and Orbax.

Library API (see docs/converters.md):
  io.load_torch_file / io.save_torch_file                PyTorch files <-> {key: numpy}
  sd_base.load_base_model / sd_base.export_ldm           SD1.5 UNet + VAE + CLIP
  motion_module_files.load_motion_module / export_motion_module
  motion_module_keys                                     official <-> diffusers motion-module names
  lora_files.load_motion_lora / load_domain_adapter / export_lora / merge_kohya_lora
  convert.to_orbax / convert.to_torch                    what the CLI runs
The Orbax model directories themselves are the library's: `adiff_jax.model_dir`.
"""
from convert_weights.errors import ConversionError  # noqa: F401
