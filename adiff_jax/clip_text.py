"""CLIP text encoder (the SD1.5 `text_encoder`, OpenAI CLIP ViT-L/14 text tower) in Flax linen.

Parameter tree (mirrors the transformers/diffusers checkpoint, see docs/params.md):

    text_model/embeddings/{token_embedding,position_embedding}/embedding
    text_model/encoder/layers_i/{layer_norm1, self_attn/{q_proj,k_proj,v_proj,out_proj},
                                 layer_norm2, mlp/{fc1,fc2}}
    text_model/final_layer_norm

Pre-LN transformer with a causal mask. Parameters are stored in `param_dtype`, matmuls run in
`dtype`; layer norms and the attention softmax always run in f32.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from adiff_jax.attention import dot_product_attention
from adiff_jax.layers import LoRADense
from adiff_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"  # SD1.5 (OpenAI CLIP); "gelu" for e.g. OpenCLIP-trained towers

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise InputError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise InputError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")

  @classmethod
  def sd15(cls) -> "CLIPTextConfig":
    """openai/clip-vit-large-patch14 text tower, as shipped in SD1.x `text_encoder/`."""
    return cls()

  @classmethod
  def tiny(cls) -> "CLIPTextConfig":
    """Test-sized model; keeps the real vocabulary so tokenizer output can be fed to it."""
    return cls(hidden_size=32, intermediate_size=37, num_layers=2, num_heads=4)


def quick_gelu(x):
  # OpenAI CLIP's sigmoid approximation of GELU; the SD1.5 weights were trained with it.
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # transformers "gelu" = erf form
}


def _layer_norm(cfg: CLIPTextConfig, param_dtype, name: str) -> nn.LayerNorm:
  # f32 statistics whatever the compute dtype; callers cast the result back.
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=param_dtype,
                      name=name)


class CLIPAttention(nn.Module):
  """Causal multi-head self-attention: q_proj, k_proj, v_proj, out_proj (all with bias)."""
  config: CLIPTextConfig
  attention_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # x (B, L, C)
    cfg = self.config
    heads, dim_head = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    dense = functools.partial(LoRADense, cfg.hidden_size, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    split = lambda t: t.reshape(t.shape[:-1] + (heads, dim_head))  # (B, L, H, D)
    q = split(dense(name="q_proj")(x))
    k = split(dense(name="k_proj")(x))
    v = split(dense(name="v_proj")(x))
    o = dot_product_attention(q, k, v, is_causal=True, attention_impl=self.attention_impl)
    o = o.reshape(o.shape[:-2] + (cfg.hidden_size,))  # (B, L, C)
    return dense(name="out_proj")(o)


class CLIPMLP(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = functools.partial(LoRADense, dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(cfg.intermediate_size, name="fc1")(x)  # (B, L, intermediate)
    h = _ACTIVATIONS[cfg.hidden_act](h)
    return dense(cfg.hidden_size, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  config: CLIPTextConfig
  attention_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _layer_norm(cfg, self.param_dtype, "layer_norm1")(x).astype(self.dtype)
    x = x + CLIPAttention(cfg, self.attention_impl, name="self_attn", **kw)(h)
    h = _layer_norm(cfg, self.param_dtype, "layer_norm2")(x).astype(self.dtype)
    return x + CLIPMLP(cfg, name="mlp", **kw)(h)


class CLIPEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids):  # (B, L) int -> (B, L, C)
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding", **kw)(input_ids)
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding",
                   **kw)(jnp.arange(input_ids.shape[1]))  # (L, C), broadcast over B
    return tok + pos[None]


class CLIPEncoder(nn.Module):
  config: CLIPTextConfig
  attention_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, num_layers: int):
    """Runs the first `num_layers` layers; all layers still get parameters at init."""
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Build every layer so the tree is complete even when clip_skip > 1 at init time.
    layers = [CLIPEncoderLayer(cfg, self.attention_impl, name=f"layers_{i}", **kw)
              for i in range(cfg.num_layers)]
    if self.is_initializing():
      for layer in layers[num_layers:]:
        layer(x)  # parameters only; the result is discarded
    for layer in layers[:num_layers]:
      x = layer(x)
    return x


class CLIPTextTransformer(nn.Module):
  config: CLIPTextConfig
  attention_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, clip_skip: int):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = CLIPEmbeddings(cfg, name="embeddings", **kw)(input_ids)
    x = CLIPEncoder(cfg, self.attention_impl, name="encoder", **kw)(x, cfg.num_layers - clip_skip + 1)
    return _layer_norm(cfg, self.param_dtype, "final_layer_norm")(x).astype(self.dtype)


class CLIPTextModel(nn.Module):
  """SD text encoder. `model.apply(params, ids)` -> last_hidden_state (B, L, hidden).

  clip_skip (static Python int, 1..num_layers): 1 = the normal output (last layer, then
  final_layer_norm). k > 1 = the hidden state entering the k-1'th layer from the end, i.e.
  transformers' `hidden_states[-k]`, passed through final_layer_norm: the A1111/ComfyUI
  "CLIP skip" convention (clip_skip=2 is common for anime-style SD1.5 checkpoints). The
  skipped layers are not computed.

  return_pooled=True returns (last_hidden_state, pooled (B, hidden)): the state at the eos
  position, taken as argmax(input_ids) (eos 49407 is the largest id; SD convention).
  """
  config: CLIPTextConfig = CLIPTextConfig()
  attention_impl: Optional[str] = None  # passed to dot_product_attention
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, clip_skip: int = 1, return_pooled: bool = False):
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise InputError(f"input_ids must be (batch, seq_len), got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise InputError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}; tokenize with truncation")
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not (
        1 <= clip_skip <= cfg.num_layers):
      raise InputError(f"clip_skip must be an int in [1, {cfg.num_layers}], got {clip_skip!r}")
    hidden = CLIPTextTransformer(cfg, self.attention_impl, self.dtype, self.param_dtype,
                                 name="text_model")(input_ids, clip_skip)  # (B, L, hidden)
    if not return_pooled:
      return hidden
    eos_pos = jnp.argmax(input_ids, axis=-1)  # first occurrence: the eos, not the eos padding
    pooled = jnp.take_along_axis(hidden, eos_pos[:, None, None], axis=1)[:, 0]  # (B, hidden)
    return hidden, pooled
