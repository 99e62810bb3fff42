"""sample.py with SparseCtrl: the three official prompt configs (configs/prompts/3_sparsectrl/*.yaml,
written here with tiny stand-in files at their paths) run on a tiny model; flags; errors before
compiling; the official image preparation (centre crop + resize)."""
import os
import sys
import textwrap

import numpy as np
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
from adiff_jax.errors import InputError  # noqa: E402

RGB = "models/SparseCtrl/v3_sd15_sparsectrl_rgb.ckpt"
SCRIBBLE = "models/SparseCtrl/v3_sd15_sparsectrl_scribble.ckpt"
MM = "models/Motion_Module/v3_sd15_mm.ckpt"
ADAPTER = "models/Motion_Module/v3_sd15_adapter.ckpt"
DREAMBOOTH = "models/DreamBooth_LoRA/realisticVisionV60B1_v51VAE.safetensors"


def _entry(name, ctrl_cfg, ctrl, indices, images, prompts, dreambooth="", seed=-1):
  """One entry with the official keys and values (H/W/steps shrunk for the tiny model)."""
  return {"adapter_lora_scale": 1.0, "adapter_lora_path": ADAPTER, "dreambooth_path": dreambooth,
          "inference_config": "configs/inference/inference-v3.yaml", "motion_module": MM,
          "controlnet_config": f"configs/inference/sparsectrl/{ctrl_cfg}.yaml", "controlnet_path": ctrl,
          "H": 32, "W": 48, "seed": seed, "steps": 2, "guidance_scale": 8.5,
          "controlnet_image_indexs": indices, "controlnet_images": images, "prompt": prompts,
          "n_prompt": ["worst quality, low quality, letterboxed"]}


def official_configs():
  img, scr = "__assets__/demos/image/", "__assets__/demos/scribble/"
  two = lambda p: [p, p]
  return {
      "3_1_sparsectrl_i2v.yaml": [
          _entry("1", "latent_condition", RGB, [0], [img + "painting.png"],
                 two("an oil painting of a sailboat in the ocean wave"), seed=[123, 234]),
          _entry("2", "latent_condition", RGB, [0, -1], [img + "interpolation_1.png", img + "interpolation_2.png"],
                 two("aerial view, beautiful forest, autumn, 4k, high quality"), seed=[123, 234]),
          _entry("3", "latent_condition", RGB, [0, 5, 10, 15], [img + f"low_fps_{i}.png" for i in range(1, 5)],
                 two("two people holding hands in a field"), seed=[123, 234]),
          _entry("4", "latent_condition", RGB, [0, 1, 2, 3], [img + f"prediction_{i}.png" for i in range(1, 5)],
                 two("an astronaut is flying in the space, 4k, high resolution"), seed=[123, 234])],
      "3_2_sparsectrl_rgb_RealisticVision.yaml": [
          _entry("1", "latent_condition", RGB, [0], [img + "RealisticVision_firework.png"],
                 two("closeup face photo of man in black clothes, night city street"), DREAMBOOTH),
          _entry("2", "latent_condition", RGB, [0], [img + "RealisticVision_sunset.png"],
                 two("sunset, orange sky, fishing boats"), DREAMBOOTH)],
      "3_3_sparsectrl_sketch_RealisticVision.yaml": [
          _entry("1", "image_condition", SCRIBBLE, [0], [scr + "scribble_1.png"],
                 ["a back view of a boy", "a back view of a boy, sunset"], DREAMBOOTH),
          _entry("2", "image_condition", SCRIBBLE, [0, 8, 15], [scr + f"scribble_2_{i}.png" for i in (1, 2, 3)],
                 ["an aerial view of a modern city", "an aerial view of a cyberpunk city"], DREAMBOOTH)],
  }


def _ctrl_kwargs(simplified: bool) -> str:
  return textwrap.dedent(f"""\
      controlnet_additional_kwargs:
        set_noisy_sample_input_to_zero:     true
        use_simplified_condition_embedding: {str(simplified).lower()}
        conditioning_channels:              {4 if simplified else 3}
      """)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """A folder laid out as the official repo expects: tiny stand-ins at every path."""
  import torch
  from diffusers import MotionAdapter
  from PIL import Image
  from adiff_jax.lora import domain_adapter_filter
  from adiff_jax.model import ModelConfig
  from adiff_jax.params import flatten
  from adiff_jax.sparse_ctrl import SparseCtrlConfig, random_params
  from adiff_jax.tokenizer import CLIPTokenizer
  from convert_weights import io
  from convert_weights.sparse_ctrl_files import sparse_ctrl_state_dict
  from convert_weights.tree import path_to_torch_key
  from torch_ref import randomize_, tiny_text_encoder, tiny_unet2d, tiny_vae, unet_params_from_diffusers

  root = tmp_path_factory.mktemp("official")
  p = lambda rel: str(root / rel)
  cfg = ModelConfig.tiny()
  torch.manual_seed(0)
  unet = randomize_(tiny_unet2d(), 1)
  text, vae = tiny_text_encoder(3), tiny_vae(4)
  base = p(DREAMBOOTH)       # a diffusers folder stands in for the DreamBooth file
  unet.save_pretrained(os.path.join(base, "unet"))
  vae.save_pretrained(os.path.join(base, "vae"))
  text.save_pretrained(os.path.join(base, "text_encoder"))
  CLIPTokenizer.default().save_pretrained(os.path.join(base, "tokenizer"))
  randomize_(MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2,
                           motion_num_attention_heads=2, motion_norm_num_groups=8,
                           motion_max_seq_length=32, use_motion_mid_block=False), 2).save_pretrained(p(MM))
  # Domain adapter: an official processor-LoRA file on the spatial attentions.
  rng = np.random.default_rng(6)
  sd = {}
  for path, v in flatten(unet_params_from_diffusers(unet)).items():
    parts = path.split("/")
    if parts[-1] == "kernel" and parts[-2] in ("to_q", "to_k", "to_v", "to_out_0") and domain_adapter_filter(path):
      layer = path_to_torch_key(tuple(parts))[:-len(".weight")]
      mod, proj = (layer[:-len(".to_out.0")], "to_out") if layer.endswith("to_out.0") else layer.rsplit(".", 1)
      sd[f"{mod}.processor.{proj}_lora.down.weight"] = 0.1 * rng.standard_normal((2, v.shape[0])).astype(np.float32)
      sd[f"{mod}.processor.{proj}_lora.up.weight"] = 0.1 * rng.standard_normal((v.shape[1], 2)).astype(np.float32)
  io.save_torch_file(sd, p(ADAPTER))
  # SparseCtrl files (official layout); the scribble embedding downsamples by the tiny VAE's 4.
  for path, ctrl in ((RGB, SparseCtrlConfig.rgb()),
                     (SCRIBBLE, SparseCtrlConfig.scribble(conditioning_embedding_channels=(8, 16, 16)))):
    tree = random_params(ctrl, cfg.unet, seed=7)
    tree = {k: v for k, v in tree.items()}
    io.save_torch_file(sparse_ctrl_state_dict(tree, ctrl, "original"), p(path))
  os.makedirs(p("configs/inference/sparsectrl"))
  with open(p("configs/inference/sparsectrl/latent_condition.yaml"), "w") as f:
    f.write(_ctrl_kwargs(True))
  with open(p("configs/inference/sparsectrl/image_condition.yaml"), "w") as f:
    f.write(_ctrl_kwargs(False))
  os.makedirs(p("configs/prompts/3_sparsectrl"))
  rng = np.random.default_rng(0)
  for name, entries in official_configs().items():
    with open(p(f"configs/prompts/3_sparsectrl/{name}"), "w") as f:
      yaml.safe_dump(entries, f, sort_keys=False)
    for e in entries:
      for i, im in enumerate(e["controlnet_images"]):
        os.makedirs(os.path.dirname(p(im)), exist_ok=True)
        size = (64, 64) if i == 0 else (48, 32)     # (W, H): one of another aspect -> centre crop
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p(im))
  return root


@pytest.mark.parametrize("name", sorted(official_configs()))
def test_official_sparsectrl_prompt_configs_run(workspace, name, monkeypatch, tmp_path, capsys):
  monkeypatch.chdir(workspace)
  argv = ["--config", f"configs/prompts/3_sparsectrl/{name}", "--ckpt", DREAMBOOTH, "--frames", "16",
          "--out", str(tmp_path / "o"), "--cache-dir", str(workspace / "cache"),
          "--compile-cache", str(workspace / "xla")]
  with pytest.warns(UserWarning, match="inference-v3.yaml"):   # no official inference config here
    assert sample.main(argv) == 0
  log = capsys.readouterr().out
  entries = official_configs()[name]
  assert log.count("SparseCtrl ") >= len(entries)
  assert "centre-cropped to 64x43 and resized to 48x32" in log
  (run,) = os.listdir(tmp_path / "o")
  for i, e in enumerate(entries):
    d = os.path.join(tmp_path / "o", run, str(i))
    resolved = yaml.safe_load(open(os.path.join(d, "config.yaml")))
    assert resolved["controlnet_image_indexs"] == e["controlnet_image_indexs"]
    assert resolved["controlnet_path"] == e["controlnet_path"] and resolved["L"] == 16
    assert len(os.listdir(os.path.join(d, "control_images"))) == len(e["controlnet_images"])
    assert len([f for f in os.listdir(os.path.join(d, "sample")) if f.endswith(".gif")]) == 2


def test_flags_and_errors_before_compiling(workspace, monkeypatch, tmp_path, capsys):
  monkeypatch.chdir(workspace)
  img = "__assets__/demos/scribble/scribble_2_2.png"   # 48x32
  base = ["--ckpt", DREAMBOOTH, "--motion-module", MM, "--cache-dir", str(workspace / "cache"),
          "--frames", "8", "--height", "32", "--width", "48", "--steps", "2", "--seed", "1",
          "--out", str(tmp_path / "o"), "--no-compile-cache", "--prompt", "a city"]
  assert sample.main(base + ["--sparsectrl", SCRIBBLE, "--cond-image", f"{img}:0",
                             "--cond-image", f"{img}:-1", "--controlnet-scale", "0.5"]) == 0
  log = capsys.readouterr().out
  assert "SparseCtrl scribble" in log and "keyframes at [0, -1], scale 0.5" in log

  def fails(extra, needle):
    with pytest.raises(InputError, match=needle):
      sample.main(base + extra)
  fails(["--sparsectrl", RGB, "--cond-image", f"{img}:8"], "outside a 8-frame video")
  fails(["--sparsectrl", RGB, "--cond-image", "missing.png:0"], "not found: missing.png")
  fails(["--sparsectrl", RGB], "needs keyframe images")
  fails(["--cond-image", img], "needs --sparsectrl")
  fails(["--sparsectrl", ADAPTER, "--cond-image", img], "not a SparseCtrl")
  fails(["--sparsectrl", RGB, "--cond-image", f"{img}:1", "--cond-image", f"{img}:1"], "same frame twice")
  bad = tmp_path / "b.yaml"
  bad.write_text(yaml.safe_dump([{"prompt": ["x"], "controlnet_path": RGB, "controlnet_images": [img, img],
                                  "controlnet_image_indexs": [0]}]))
  fails(["--config", str(bad)], "2 condition images but 1 frame indices")
  mismatch = tmp_path / "m.yaml"
  mismatch.write_text(yaml.safe_dump([{"prompt": ["x"], "controlnet_path": SCRIBBLE, "controlnet_images": [img],
                                       "controlnet_config": "configs/inference/sparsectrl/latent_condition.yaml"}]))
  fails(["--config", str(mismatch)], "is a scribble SparseCtrl")


def test_keyframe_images_centre_crop_like_torchvision(tmp_path):
  """The official RandomResizedCrop((H, W), scale=(1, 1), ratio=(W/H, W/H)) on another aspect is a
  centre crop + bilinear resize; the same size is the image itself."""
  from PIL import Image
  rng = np.random.default_rng(1)
  a = rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)        # (H, W): wider than 32x48
  Image.fromarray(a).save(tmp_path / "a.png")
  got = sample.load_keyframe_images([str(tmp_path / "a.png")], 32, 48)[0]
  ch, cw = 40, 60                                               # crop to the 3:2 aspect
  left = (90 - cw) // 2
  want = np.asarray(Image.fromarray(a[:, left:left + cw]).resize((48, 32), Image.BILINEAR), np.float32) / 255
  np.testing.assert_array_equal(got, want)
  same = sample.load_keyframe_images([str(tmp_path / "a.png")], 40, 90)[0]
  np.testing.assert_array_equal(same, a / np.float32(255))
