"""CLIP text encoders in Flax linen: the SD1.5 `text_encoder` (OpenAI CLIP ViT-L/14 text tower,
transformers `CLIPTextModel`) and, with `projection_dim`, SDXL's `text_encoder_2` (OpenCLIP
ViT-bigG/14 text tower, transformers `CLIPTextModelWithProjection`).

Parameter tree (mirrors the transformers/diffusers checkpoint, see docs/params.md):

    text_model/embeddings/{token_embedding,position_embedding}/embedding
    text_model/encoder/layers_i/{layer_norm1, self_attn/{q_proj,k_proj,v_proj,out_proj},
                                 layer_norm2, mlp/{fc1,fc2}}
    text_model/final_layer_norm
    text_projection/kernel (hidden, projection_dim)     only with projection_dim (no bias)

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
  # transformers' CLIPTextModelWithProjection: a bias-free `text_projection` of the pooled state
  # (SDXL's text_encoder_2: 1280). None: plain CLIPTextModel (SD1.5, SDXL's first encoder).
  projection_dim: Optional[int] = None

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise InputError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise InputError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")
    if self.projection_dim is not None and (isinstance(self.projection_dim, bool) or not isinstance(
        self.projection_dim, int) or self.projection_dim < 1):
      raise InputError(f"projection_dim must be a positive int or None, got {self.projection_dim!r}")

  @classmethod
  def sd15(cls) -> "CLIPTextConfig":
    """openai/clip-vit-large-patch14 text tower, as shipped in SD1.x `text_encoder/`."""
    return cls()

  @classmethod
  def sdxl_l(cls) -> "CLIPTextConfig":
    """SDXL's first text encoder (`text_encoder/`): the same CLIP ViT-L/14 tower as SD1.5."""
    return cls.sd15()

  @classmethod
  def sdxl_bigg(cls) -> "CLIPTextConfig":
    """SDXL's second text encoder (`text_encoder_2/`): OpenCLIP ViT-bigG/14's text tower as
    transformers' CLIPTextModelWithProjection (exact GELU, 1280-wide projection, 694,659,840
    parameters)."""
    return cls(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20,
               hidden_act="gelu", projection_dim=1280)

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
  def __call__(self, x, num_layers: int) -> list:
    """Runs the first `num_layers` layers; all layers still get parameters at init. Returns the
    hidden states [input, after layer 1, ..., after layer num_layers] (with every layer run:
    transformers' `hidden_states`)."""
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Build every layer so the tree is complete even when clip_skip > 1 at init time.
    layers = [CLIPEncoderLayer(cfg, self.attention_impl, name=f"layers_{i}", **kw)
              for i in range(cfg.num_layers)]
    if self.is_initializing():
      for layer in layers[num_layers:]:
        layer(x)  # parameters only; the result is discarded
    states = [x]
    for layer in layers[:num_layers]:
      x = layer(x)
      states.append(x)
    return states


class CLIPTextTransformer(nn.Module):
  config: CLIPTextConfig
  attention_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, clip_skip: int, hidden_state: Optional[int] = None, pool: bool = False):
    """-> (output, last): output = final_layer_norm(hidden_states[-clip_skip]), or
    hidden_states[-hidden_state] as is when hidden_state is given; last = the final normed
    state of the last layer (transformers' last_hidden_state) when pool, else None. Only the
    layers these need are run."""
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = CLIPEmbeddings(cfg, name="embeddings", **kw)(input_ids)
    k = clip_skip if hidden_state is None else hidden_state
    depth = cfg.num_layers if pool else cfg.num_layers - k + 1
    states = CLIPEncoder(cfg, self.attention_impl, name="encoder", **kw)(x, depth)
    norm = _layer_norm(cfg, self.param_dtype, "final_layer_norm")
    h = states[cfg.num_layers - k + 1]  # transformers hidden_states[-k]
    out = h if hidden_state is not None else norm(h).astype(self.dtype)
    if not pool:
      return out, None
    if hidden_state is None and k == 1:
      return out, out
    return out, norm(states[-1]).astype(self.dtype)


class CLIPTextModel(nn.Module):
  """SD / SDXL text encoder. `model.apply(params, ids)` -> last_hidden_state (B, L, hidden).

  clip_skip (static Python int, 1..num_layers): 1 = the normal output (last layer, then
  final_layer_norm). k > 1 = the hidden state entering the k-1'th layer from the end, i.e.
  transformers' `hidden_states[-k]`, passed through final_layer_norm: the A1111/ComfyUI
  "CLIP skip" convention (clip_skip=2 is common for anime-style SD1.5 checkpoints). The
  skipped layers are not computed.

  hidden_state (static int, 1..num_layers + 1, or None): return transformers'
  `hidden_states[-hidden_state]` as is, WITHOUT final_layer_norm (the SDXL convention: both
  SDXL encoders give `hidden_states[-2]`; see `adiff_jax.sdxl_text`). Excludes clip_skip > 1.

  return_pooled=True returns (hidden, pooled): transformers' pooler_output, the final state
  (last layer, final_layer_norm) at the eos position, taken as argmax(input_ids) (eos 49407
  is the largest id: transformers' rule for configs with the legacy eos_token_id 2, which
  SD1.5's and SDXL's both have, and the same position as its first-eos rule on tokenizer
  output); projected by `text_projection` when the config has `projection_dim`
  (CLIPTextModelWithProjection's text_embeds, (B, projection_dim)), else (B, hidden). All
  layers run then, whatever clip_skip / hidden_state select for `hidden`.
  """
  config: CLIPTextConfig = CLIPTextConfig()
  attention_impl: Optional[str] = None  # passed to dot_product_attention
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, clip_skip: int = 1, return_pooled: bool = False,
               hidden_state: Optional[int] = None):
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
    if hidden_state is not None:
      if isinstance(hidden_state, bool) or not isinstance(hidden_state, int) or not (
          1 <= hidden_state <= cfg.num_layers + 1):
        raise InputError(f"hidden_state must be None or an int in [1, {cfg.num_layers + 1}] "
                         f"(transformers hidden_states[-k]), got {hidden_state!r}")
      if clip_skip != 1:
        raise InputError("give clip_skip or hidden_state, not both")
    hidden, last = CLIPTextTransformer(cfg, self.attention_impl, self.dtype, self.param_dtype,
                                       name="text_model")(input_ids, clip_skip, hidden_state,
                                                          return_pooled)  # (B, L, hidden)
    proj = None
    if cfg.projection_dim is not None:
      proj = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="text_projection")
    if not return_pooled:
      if proj is not None and self.is_initializing():
        proj(hidden[:, 0])  # parameters only
      return hidden
    eos_pos = jnp.argmax(input_ids, axis=-1)  # first occurrence: the eos, not the eos padding
    pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]  # (B, hidden)
    if proj is not None:
      pooled = proj(pooled)  # (B, projection_dim)
    return hidden, pooled
