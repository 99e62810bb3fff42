"""Conv2d's three code paths (matmul, im2col, XLA conv) against torch.nn.functional.conv2d."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from adiff_jax.layers import _CPU_IM2COL_MAX_PIXELS, _conv


@pytest.mark.parametrize("h,k,stride,pad", [
    (2, 3, 1, 1),    # tiny image: im2col on CPU
    (4, 3, 2, 1),    # stride-2 downsampling, im2col
    (7, 3, 1, 1),    # 49 pixels: im2col
    (3, 1, 1, 0),    # 1x1: matmul
    (12, 3, 1, 1),   # 144 pixels: XLA conv
    (12, 3, 2, 1),   # XLA conv, stride 2
])
def test_conv_paths_match_torch(h, k, stride, pad):
  rng = np.random.default_rng(h * 10 + k)
  x = rng.standard_normal((3, h, h, 6)).astype(np.float32)
  w = rng.standard_normal((k, k, 6, 5)).astype(np.float32)
  got = np.asarray(_conv(jnp.asarray(x), jnp.asarray(w), stride, pad))
  want = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                    torch.from_numpy(w).permute(3, 2, 0, 1),
                                    stride=stride, padding=pad).permute(0, 2, 3, 1).numpy()
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert _CPU_IM2COL_MAX_PIXELS == 64  # the cases above straddle the threshold
