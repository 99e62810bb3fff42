import os

# Tests run on CPU in f32; keep PyTorch references deterministic and single-process friendly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seed():
  np.random.seed(0)
  try:
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  except ImportError:
    pass


def pytest_collection_modifyitems(config, items):
  # Full-size checks hold several GB each: run them one after another on one xdist worker
  # (`--dist loadgroup`), never two at once on the 24 GB CI machine.
  for item in items:
    if item.get_closest_marker("slow") is not None:
      item.add_marker(pytest.mark.xdist_group("fullsize"))
