"""SparseCtrl key table: diffusers `SparseControlNetModel` names <-> official (guoyww) names.

Official `animatediff/models/sparse_controlnet.py` (v3_sd15_sparsectrl_{rgb,scribble}.ckpt):
  conv_in; controlnet_cond_embedding.{weight,bias} (RGB: one conv, 4 + 1 mask channels) or
  controlnet_cond_embedding.{conv_in, blocks.0-5, conv_out} (scribble: 3 + 1 channels);
  time_embedding.linear_{1,2}; down_blocks.N.{resnets, attentions, downsamplers} as the UNet;
  down_blocks.N.motion_modules.M.temporal_transformer.{norm, proj_in, proj_out,
  transformer_blocks.0.{attention_blocks.0, norms.0, ff, ff_norm}} (ONE attention block) and
  the buffer `...transformer_blocks.0.attention_blocks.0.pos_encoder.pe`; mid_block.{resnets,
  attentions}; controlnet_down_blocks.K (1x1 convs, one per UNet skip feature);
  controlnet_mid_block. Files may wrap this in {"controlnet": ...} (the official loader) or
  {"state_dict": ...} (diffusers' conversion script) and may carry `animatediff_config`.
diffusers (`scripts/convert_animatediff_sparsectrl_to_diffusers.py`): the same names except
  in motion modules (no `temporal_transformer.`, attn1 / norm1 / norm3) and the buffer
  `...transformer_blocks.0.pos_embed.pe`.
Our tree uses the official names (through `convert_weights.tree`'s generic rule).
"""
from __future__ import annotations

import re

from convert_weights.motion_module_keys import diffusers_to_official as _mm_to_official
from convert_weights.motion_module_keys import official_to_diffusers as _mm_to_diffusers

# (diffusers, official) pe buffer of transformer block N: the only SparseCtrl-specific rename
# beyond the motion-module table.
_PE = (re.compile(r"\.transformer_blocks\.(\d+)\.pos_embed\.pe$"),
       re.compile(r"\.transformer_blocks\.(\d+)\.attention_blocks\.0\.pos_encoder\.pe$"))
_PE_SUB = (r".transformer_blocks.\1.pos_embed.pe", r".transformer_blocks.\1.attention_blocks.0.pos_encoder.pe")

# Keys that make a file a SparseCtrl (with motion modules) and tell RGB from scribble.
CONTROLNET_PREFIXES = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
RGB_KEY = "controlnet_cond_embedding.weight"            # use_simplified_condition_embedding
SCRIBBLE_KEY = "controlnet_cond_embedding.conv_in.weight"


def is_sparse_ctrl(keys) -> bool:
  keys = list(keys)
  return (any(k.startswith(CONTROLNET_PREFIXES[0]) for k in keys)
          and any(k.startswith(CONTROLNET_PREFIXES[1]) for k in keys)
          and any("motion_modules." in k for k in keys))


def kind(keys) -> str:
  """"rgb" (one-conv condition embedding), "scribble" (the ControlNet embedding) or "unknown"."""
  keys = set(keys)
  return "rgb" if RGB_KEY in keys else "scribble" if SCRIBBLE_KEY in keys else "unknown"


def is_pe_buffer(key: str) -> bool:
  """A positional-encoding buffer (either format; official ones of any attention block)."""
  return bool(_PE[0].search(key)) or (key.endswith(".pos_encoder.pe") and "motion_modules." in key)


def diffusers_to_official(key: str) -> str:
  """`down_blocks.0.motion_modules.1.transformer_blocks.0.attn1.to_q.weight` ->
  `down_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight`;
  `...transformer_blocks.0.pos_embed.pe` -> `...temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe`;
  every other key is the same in both."""
  return _PE[0].sub(_PE_SUB[1], _mm_to_official(key))


def official_to_diffusers(key: str) -> str:
  return _mm_to_diffusers(_PE[1].sub(_PE_SUB[0], key))
