"""The attention function against torch's scaled_dot_product_attention (every CPU code path)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from adiff_jax.attention import dot_product_attention


@pytest.mark.parametrize("b,lq,lk,h,d,causal", [
    (2, 7, 7, 3, 8, False),       # short: one batched einsum
    (3, 16, 77, 2, 8, False),     # cross-attention shapes
    (2, 300, 300, 3, 4, False),   # long: heads in blocks (lax.map)
    (1, 260, 260, 5, 4, True),    # causal
])
def test_matches_torch_sdpa(b, lq, lk, h, d, causal):
  rng = np.random.default_rng(lq)
  q = rng.standard_normal((b, lq, h, d)).astype(np.float32)
  k = rng.standard_normal((b, lk, h, d)).astype(np.float32)
  v = rng.standard_normal((b, lk, h, d)).astype(np.float32)
  got = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                         is_causal=causal))
  t = lambda a: torch.from_numpy(a).permute(0, 2, 1, 3)
  want = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=causal)
  np.testing.assert_allclose(got, want.permute(0, 2, 1, 3).numpy(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("lq", [7, 300])     # one einsum; heads in checkpointed blocks
def test_gradients_match_torch_autograd(lq):
  """The training path: d(sum(out * w))/d(q, k, v) against torch autograd through SDPA. The
  blocked CPU path recomputes its softmax in the backward pass (jax.checkpoint)."""
  import jax
  rng = np.random.default_rng(1)
  q, k, v = (rng.standard_normal((2, lq, 3, 4)).astype(np.float32) for _ in range(3))
  w = rng.standard_normal((2, lq, 3, 4)).astype(np.float32)
  loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v) * w)
  got = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  t = [torch.from_numpy(a).permute(0, 2, 1, 3).requires_grad_() for a in (q, k, v)]
  out = torch.nn.functional.scaled_dot_product_attention(*t)
  (out * torch.from_numpy(w).permute(0, 2, 1, 3)).sum().backward()
  for g, tt in zip(got, t):
    np.testing.assert_allclose(np.asarray(g), tt.grad.permute(0, 2, 1, 3).numpy(), atol=5e-5, rtol=1e-4)


def test_mask_and_bad_input():
  q = jnp.ones((1, 4, 2, 8))
  mask = jnp.array([True, True, False, False])[None, None, None, :]
  v = jnp.arange(4, dtype=jnp.float32)[None, :, None, None] * jnp.ones((1, 4, 2, 8))
  out = dot_product_attention(q, q, v, mask=mask)
  np.testing.assert_allclose(out, 0.5, atol=1e-6)   # only keys 0 and 1 (values 0, 1) are seen
  with pytest.raises(ValueError, match="attention_impl"):
    dot_product_attention(q, q, q, attention_impl="flash")
  with pytest.raises(ValueError, match=r"\(B, L, H, D\)"):
    dot_product_attention(q[0], q[0], q[0])


def test_cudnn_fallback_warns_once(monkeypatch, caplog):
  """Where cuDNN is chosen automatically but cannot run (here: the CPU), attention falls back to
  XLA with the same result and says so once at WARNING, however many layers hit it."""
  import logging
  from adiff_jax import attention as A
  monkeypatch.setattr(A, "_cudnn_allowed", lambda q, k, mask: True)
  A._warn_fallback.cache_clear()
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.float32) for _ in range(3))
  with caplog.at_level(logging.WARNING, logger="adiff_jax.attention"):
    out = [A.dot_product_attention(q, k, v) for _ in range(3)]
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "using XLA attention" in warnings[0].getMessage()
  want = A.dot_product_attention(q, k, v, attention_impl="xla")
  for o in out:
    np.testing.assert_allclose(np.asarray(o), np.asarray(want), rtol=0, atol=0)


def test_cudnn_probe_falls_back_where_it_does_not_compile(monkeypatch, caplog):
  """Head dims up to 256 are offered to cuDNN on GPU only after a stand-alone compile of its
  forward and backward succeeds; where it does not (here: a CPU posing as the GPU backend), the
  model's attention takes XLA, with one warning per head dim, and the same result."""
  import logging
  from adiff_jax import attention as A
  monkeypatch.setattr(A, "_backend", lambda: "gpu")
  A._cudnn_compiles.cache_clear()
  A._warn_fallback.cache_clear()
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 16, 2, 160)), jnp.bfloat16) for _ in range(3))
  with caplog.at_level(logging.WARNING, logger="adiff_jax.attention"):
    out = [jax.jit(A.dot_product_attention)(q, k, v) for _ in range(2)]
  A._cudnn_compiles.cache_clear()
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "does not compile for head dim 160" in warnings[0], warnings
  want = A.dot_product_attention(q, k, v, attention_impl="xla")
  for o in out:
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(want, np.float32))
