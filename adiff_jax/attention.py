"""The one attention function of the project, and the attention layer built on it.

Every attention in the project (spatial self/cross attention, temporal motion-module
attention, VAE mid-block attention, CLIP) calls `dot_product_attention`.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from adiff_jax.layers import LoRADense
from adiff_jax.errors import InputError

_log = logging.getLogger(__name__)

ATTENTION_IMPLS = (None, "xla", "cudnn")


def _xla_attention(q, k, v, mask, is_causal, scale):
  # Scale q, not the logits: a scalar times the (B, H, Lq, Lk) logits gets materialised as a
  # full-size broadcast on CPU.
  q = q * jnp.asarray(scale, q.dtype)
  lq, lk = q.shape[1], k.shape[1]
  if is_causal:
    causal = jnp.tril(jnp.ones((lq, lk), dtype=bool), k=lk - lq)
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is None and _backend() == "cpu" and lq * lk >= _CPU_BLOCK_MIN_LOGITS:
    return _cpu_blocked_attention(q, k, v)
  return _attend(q, k, v, mask)


def _attend(q, k, v, mask):
  # Logits and softmax statistics in f32 whatever the compute dtype: bf16 softmax loses too much.
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  p, denom = _unnormalised_softmax(logits)                          # (B, H, Lq, Lk), (B, H, Lq, 1)
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / denom.transpose(0, 2, 1, 3)).astype(q.dtype)


def _unnormalised_softmax(logits):
  """exp(logits - max) and its row sums: softmax(logits) @ v == (p @ v) / sums.

  Dividing the (Lq, D) output instead of the (Lq, Lk) probabilities is Lk / D times fewer
  divisions, and on CPU it keeps the normalisation out of the second matmul's operand (XLA:CPU
  fused it there and ran that matmul ~5x slower): 15-30% off the attention on CPU. The max is a
  constant shift (the result does not depend on it), hence no gradient through it."""
  p = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  return p, jnp.sum(p, axis=-1, keepdims=True)


# On CPU, long sequences (the 64x64 and 32x32 levels of SD) are 4-8x faster when a few heads at a
# time go through softmax(q k^T) v, so that the logits stay in cache, than as one big batch.
_CPU_BLOCK_MIN_LOGITS = 256 * 256
_CPU_BLOCK_BYTES = 8 << 20


def _cpu_blocked_attention(q, k, v):
  b, lq, h, d = q.shape
  lk = k.shape[1]
  n = b * h
  group = max(1, min(n, _CPU_BLOCK_BYTES // (4 * lq * lk)))
  while n % group:
    group -= 1
  heads_first = lambda t: t.transpose(0, 2, 1, 3).reshape((n // group, group) + t.shape[1:2] + (d,))
  qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)     # (n/g, g, L, D)

  def one(args):
    qq, kk, vv = args
    logits = jnp.einsum("gqd,gkd->gqk", qq, kk, preferred_element_type=jnp.float32)
    p, denom = _unnormalised_softmax(logits)
    out = jnp.einsum("gqk,gkd->gqd", p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
    return (out / denom).astype(qq.dtype)

  # Checkpointed: under jax.grad the map would otherwise stack every group's softmax
  # probabilities for the backward pass (one (B*H, Lq, Lk) f32 array per layer: 16 x 34 MB in the
  # tiny training step); recomputing a group's logits from its q and k in the backward is cheaper
  # on CPU than the memory traffic. No effect without differentiation (sampling).
  out = jax.lax.map(jax.checkpoint(one), (qh, kh, vh))                # (n/g, g, Lq, D)
  return out.reshape(b, h, lq, d).transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=None)
def _backend() -> str:
  return jax.default_backend()


def _cudnn_allowed(q, k, mask) -> bool:
  # Head dims up to 256: cuDNN takes them on Hopper and later (SD1.5's 1280-channel levels have
  # head dim 160); elsewhere the probe below fails and we fall back to XLA with one warning.
  d = q.shape[-1]
  return (
      _backend() == "gpu"
      and q.dtype in (jnp.bfloat16, jnp.float16)
      and d <= 256 and d % 8 == 0
      and k.shape[-1] == d
      and mask is None
      and _cudnn_compiles(d, jnp.dtype(q.dtype).name)
  )


@functools.lru_cache(maxsize=None)
def _cudnn_compiles(head_dim: int, dtype: str) -> bool:
  """Whether cuDNN's fused attention, forward and backward, compiles for this head dim here.

  JAX refuses most unsupported shapes when the call is traced (caught in dot_product_attention),
  but a refusal at XLA compile time would fail the whole model's compile with no fallback: a
  small stand-alone compile per head dim (seconds, once per process) finds that first."""
  x = jax.ShapeDtypeStruct((1, 128, 1, head_dim), jnp.dtype(dtype))
  loss = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
      q, k, v, implementation="cudnn").astype(jnp.float32))
  try:
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return True
  except Exception as e:
    _warn_fallback(f"cuDNN fused attention does not compile for head dim {head_dim} {dtype} "
                   f"({describe_error(e)}); using XLA attention")
    return False


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    is_causal: bool = False,
    attention_impl: Optional[str] = None,
) -> jax.Array:
  """Multi-head scaled dot-product attention.

  Shapes: q (B, Lq, H, D), k and v (B, Lk, H, D) -> (B, Lq, H, D). `mask` is boolean,
  broadcastable to (B, H, Lq, Lk), True = attend. Scale is D**-0.5.

  attention_impl: "xla" (einsum, f32 softmax), "cudnn" (fused flash attention through
  `jax.nn.dot_product_attention`; GPU, bf16/f16 only) or None: cuDNN where the backend,
  shapes and dtypes allow it, XLA otherwise.
  """
  if attention_impl not in ATTENTION_IMPLS:
    raise InputError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise InputError(f"q, k, v must be (B, L, H, D); got {q.shape}, {k.shape}, {v.shape}")
  scale = q.shape[-1] ** -0.5
  use_cudnn = attention_impl == "cudnn" or (attention_impl is None and _cudnn_allowed(q, k, mask))
  if use_cudnn:
    try:
      return jax.nn.dot_product_attention(
          q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation="cudnn")
    except Exception as e:  # unsupported shape/version: fall back rather than fail
      if attention_impl == "cudnn":
        raise
      _warn_fallback(f"cuDNN fused attention unavailable for q {q.shape} {q.dtype} "
                     f"({describe_error(e)}); using XLA attention")
  return _xla_attention(q, k, v, mask, is_causal, scale)


def describe_error(e: BaseException) -> str:
  """"Type: first line of the message": enough to tell why cuDNN refused, short enough to log."""
  msg = str(e)
  return f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"


@functools.lru_cache(maxsize=None)
def _warn_fallback(message: str) -> None:
  # Once per distinct message: attention is traced once per layer, and a model has dozens.
  _log.warning(message)


class Attention(nn.Module):
  """Multi-head attention with diffusers/official parameter names: to_q, to_k, to_v, to_out_0.

  Input x (B, Lq, C), optional context (B, Lk, Cc) for cross-attention; output (B, Lq, C).
  `qkv_bias=False` as in the SD UNet and the motion module; the VAE uses biases.
  The projections are `LoRADense`, so MotionLoRA / domain-adapter LoRAs apply here.
  """
  heads: int
  dim_head: int
  out_dim: Optional[int] = None
  qkv_bias: bool = False
  attention_impl: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, mask=None):
    inner = self.heads * self.dim_head
    out_dim = self.out_dim or x.shape[-1]
    dense = functools.partial(LoRADense, dtype=self.dtype, param_dtype=self.param_dtype)
    ctx = x if context is None else context
    q = dense(inner, use_bias=self.qkv_bias, name="to_q")(x)
    k = dense(inner, use_bias=self.qkv_bias, name="to_k")(ctx)
    v = dense(inner, use_bias=self.qkv_bias, name="to_v")(ctx)
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, self.dim_head))  # (B, L, H, D)
    o = dot_product_attention(split(q), split(k), split(v), mask=mask,
                              attention_impl=self.attention_impl)
    o = o.reshape(o.shape[:-2] + (inner,))
    return dense(out_dim, use_bias=True, name="to_out_0")(o)
