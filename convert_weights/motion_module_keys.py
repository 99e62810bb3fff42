"""Motion-module key table: diffusers `MotionAdapter` / `UNetMotionModel` names <-> official names.

Official (guoyww/AnimateDiff) per module, prefix `...motion_modules.N.temporal_transformer.`:
  norm, proj_in, proj_out, transformer_blocks.0.{attention_blocks.{0,1}, norms.{0,1}, ff, ff_norm}
  and `attention_blocks.{0,1}.pos_encoder.pe` buffers (optional; AnimateLCM's code names the same
  sinusoidal buffer `pos_encoder.pos_encoding`, length 64, and its released file has none).
diffusers, prefix `...motion_modules.N.`:
  norm, proj_in, proj_out, transformer_blocks.0.{attn1, attn2, norm1, norm2, ff, norm3}
  and one `transformer_blocks.0.pos_embed.pe` buffer.
"""
from __future__ import annotations

import re

_TO_OFFICIAL = [
    (".attn1.", ".attention_blocks.0."),
    (".attn2.", ".attention_blocks.1."),
    (".norm1.", ".norms.0."),
    (".norm2.", ".norms.1."),
    (".norm3.", ".ff_norm."),
]
_MM = re.compile(r"(motion_modules\.\d+\.)")


def is_pe_buffer(key: str) -> bool:
  return (key.endswith(".pe") and ("pos_encoder" in key or "pos_embed" in key)
          or key.endswith(".pos_encoder.pos_encoding"))


def diffusers_to_official(key: str) -> str:
  """`down_blocks.0.motion_modules.1.transformer_blocks.0.attn1.to_q.weight` ->
  `down_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight`."""
  if "motion_modules." not in key:
    return key
  key = _MM.sub(r"\1temporal_transformer.", key, count=1)
  for a, b in _TO_OFFICIAL:
    key = key.replace(a, b)
  return key


def official_to_diffusers(key: str) -> str:
  if "motion_modules." not in key:
    return key
  key = key.replace(".temporal_transformer.", ".", 1)
  for a, b in _TO_OFFICIAL:
    key = key.replace(b, a)
  return key
