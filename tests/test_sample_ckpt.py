"""sample.py with PyTorch files: diffusers folders converted on the fly, cached, and loaded into
exactly the weights of the PyTorch models (checked against an independent key mapping)."""
import os
import sys

import jax
import numpy as np
import pytest
from diffusers import MotionAdapter, UNetMotionModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
from adiff_jax.errors import InputError  # noqa: E402
from adiff_jax.model import ModelConfig  # noqa: E402
from adiff_jax.tokenizer import CLIPTokenizer  # noqa: E402
from torch_ref import (clip_params_from_transformers, randomize_, tiny_text_encoder, tiny_unet2d,  # noqa: E402
                       tiny_vae, unet_params_from_diffusers, vae_params_from_diffusers)


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("pt")
  unet = randomize_(tiny_unet2d(), 1)
  adapter = randomize_(MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2,
                                     motion_num_attention_heads=2, motion_norm_num_groups=8,
                                     motion_max_seq_length=32, use_motion_mid_block=False), 2)
  text, vae = tiny_text_encoder(3), tiny_vae(4)
  base = root / "base"
  unet.save_pretrained(base / "unet")
  vae.save_pretrained(base / "vae")
  text.save_pretrained(base / "text_encoder")
  CLIPTokenizer.default().save_pretrained(base / "tokenizer")
  adapter.save_pretrained(root / "adapter")
  want = {"unet": unet_params_from_diffusers(UNetMotionModel.from_unet2d(unet, adapter)),
          "text_encoder": clip_params_from_transformers(text), "vae": vae_params_from_diffusers(vae)}
  return str(base), str(root / "adapter"), want


def test_pytorch_files_convert_on_the_fly_cache_and_match(torch_files, tmp_path, capsys):
  base, adapter, want = torch_files
  argv = ["--ckpt", base, "--motion-module", adapter, "--cache-dir", str(tmp_path / "cache"),
          "--frames", "4", "--steps", "2", "--height", "32", "--width", "32", "--seed", "1",
          "--out", str(tmp_path / "out")]
  assert sample.main(argv) == 0
  assert "converting PyTorch weights to Orbax once; cached at" in capsys.readouterr().out
  args = sample.parse_args(argv)
  cfg, params, lora, desc = sample.load_model(args)
  assert "using cached conversion" in capsys.readouterr().out
  assert lora is None and "v3" in desc
  assert cfg.unet == ModelConfig.tiny().unet and cfg.text == ModelConfig.tiny().text
  assert cfg.motion.max_len == 32 and not cfg.motion.mid_block
  for part in want:
    got_l = jax.tree_util.tree_flatten_with_path(params[part])[0]
    want_l = dict(jax.tree_util.tree_flatten_with_path(want[part])[0])
    assert {k for k, _ in got_l} == set(want_l), part
    for k, v in got_l:
      np.testing.assert_array_equal(np.asarray(v), want_l[k], err_msg=f"{part} {k}")


def test_missing_motion_module_and_partial_model_errors(torch_files, tmp_path):
  base, adapter, _ = torch_files
  with pytest.raises(InputError, match="no motion module"):
    sample.main(["--ckpt", base, "--cache-dir", str(tmp_path), "--frames", "4"])
  with pytest.raises(InputError, match="need --ckpt"):
    sample.main(["--motion-module", adapter])
