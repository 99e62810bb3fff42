"""SDXL text conditioning: two CLIP text encoders -> the UNet's context and pooled text.

SDXL (diffusers `StableDiffusionXLPipeline.encode_prompt`) runs both encoders on the prompt,
each tokenized by its own tokenizer (`tokenizer/` pads with eos, `tokenizer_2/` with "!"):

    context = concat(text_encoder(ids).hidden_states[-k], text_encoder_2(ids_2).hidden_states[-k])
              (B, 77, 768 + 1280 = 2048), no final_layer_norm; k = 2, or clip_skip + 2
    pooled  = text_encoder_2(ids_2).text_embeds   (B, 1280): final_layer_norm of the last layer at
              the eos position, through text_projection

`pooled` and six `time_ids` (`time_ids`) are the UNet's `added_cond`. What this module does
not do (the sampling pipeline's side): diffusers' `force_zeros_for_empty_prompt` (SDXL base:
True) makes the unconditional context and pooled all zeros when no negative prompt is given,
and diffusers encodes negative prompts with hidden_states[-2] whatever clip_skip is.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from adiff_jax.clip_text import CLIPTextModel
from adiff_jax.errors import InputError
from adiff_jax.tokenizer import CLIPTokenizer

PAD_2 = "!"  # tokenizer_2's pad token (id 0)


def hidden_state_index(clip_skip: Optional[int] = None) -> int:
  """diffusers' SDXL clip_skip -> k of hidden_states[-k]: None (or 0) -> 2 (the penultimate
  layer, SDXL's default), c -> c + 2. (Our SD1.5 `CLIPTextModel(clip_skip=c)`, the A1111
  convention, counts from 1 = the last layer: diffusers' c is our c + 1.)"""
  if clip_skip is None:
    return 2
  if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0:
    raise InputError(f"SDXL clip_skip must be None or an int >= 0, got {clip_skip!r}")
  return clip_skip + 2


def encode_sdxl(text_encoder: CLIPTextModel, params, text_encoder_2: CLIPTextModel, params_2,
                ids, ids_2, clip_skip: Optional[int] = None):
  """Both SDXL text encoders -> (context (B, L, C1 + C2), pooled (B, P)); pure, jittable with
  the two models and clip_skip static.

  text_encoder / text_encoder_2: `CLIPTextModel(config.text)` / `CLIPTextModel(config.text_2)`
    of an SDXL `ModelConfig` (the second needs `projection_dim`); params / params_2: their
    parameter trees (`params["text_encoder"]`, `params["text_encoder_2"]`, no "params" key).
  ids / ids_2: (B, L) token ids from `tokenizer` and `tokenizer_2` (`sdxl_tokenizers`).
  clip_skip: diffusers' StableDiffusionXLPipeline semantics (`hidden_state_index`).
  """
  if text_encoder_2.config.projection_dim is None:
    raise InputError("encode_sdxl: text_encoder_2 has no text_projection (its config needs "
                     "projection_dim; SDXL: CLIPTextConfig.sdxl_bigg())")
  ids, ids_2 = jnp.asarray(ids), jnp.asarray(ids_2)
  if ids.ndim != 2 or ids.shape != ids_2.shape:
    raise InputError(f"encode_sdxl: ids {ids.shape} and ids_2 {ids_2.shape} must both be "
                     "(batch, seq_len) of the same shape")
  k = hidden_state_index(clip_skip)
  layers = min(text_encoder.config.num_layers, text_encoder_2.config.num_layers)
  if k > layers + 1:
    raise InputError(f"SDXL clip_skip {clip_skip}: hidden_states[-{k}] does not exist in a "
                     f"{layers}-layer text encoder")
  h1 = text_encoder.apply({"params": params}, ids, hidden_state=k)
  h2, pooled = text_encoder_2.apply({"params": params_2}, ids_2, return_pooled=True, hidden_state=k)
  return jnp.concatenate([h1, h2.astype(h1.dtype)], axis=-1), pooled


def sdxl_tokenizers(folder: Optional[str] = None) -> tuple[CLIPTokenizer, CLIPTokenizer]:
  """(tokenizer, tokenizer_2): from a diffusers SDXL folder's `tokenizer/` and `tokenizer_2/`
  (pad tokens from their files; a folder without `tokenizer_2/` uses `tokenizer/` with "!"),
  or the built-in vocabulary (eos padding / "!" padding)."""
  if folder is None:
    return CLIPTokenizer.default(), CLIPTokenizer.default(pad=PAD_2)
  tok = CLIPTokenizer.from_pretrained(folder)
  if os.path.isfile(os.path.join(folder, "tokenizer_2", "vocab.json")):
    return tok, CLIPTokenizer.from_pretrained(folder, "tokenizer_2")
  return tok, CLIPTokenizer(tok.encoder, tok.merges, tok.max_length, pad_token=PAD_2)


def time_ids(original_size: Sequence[int], crops_coords_top_left: Sequence[int] = (0, 0),
             target_size: Optional[Sequence[int]] = None) -> np.ndarray:
  """SDXL's six micro-conditioning numbers (diffusers `_get_add_time_ids`): (original height,
  width, crop top, left, target height, width) as float32 (6,); target defaults to the
  original (diffusers: both default to the output size)."""
  target = tuple(original_size) if target_size is None else tuple(target_size)
  vals = tuple(original_size) + tuple(crops_coords_top_left) + target
  if len(vals) != 6:
    raise InputError(f"time_ids: sizes and crop are (h, w) pairs, got {original_size}, "
                     f"{crops_coords_top_left}, {target_size}")
  return np.asarray(vals, np.float32)

