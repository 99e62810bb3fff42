"""Pre-computed latents / text embeddings: the stored posterior and embeddings equal direct
encoder calls on the same clip, the loss on them equals the loss on the raw clip at equal
noise, and a run trains on them through the normal loader (shuffle, shards, state)."""
import json

import jax
import numpy as np
import pytest

from adiff_jax.train.precompute import PrecomputedSource, precompute, sampled_clips
from adiff_jax.tokenizer import CLIPTokenizer
from adiff_jax.train import state as S
from adiff_jax.train.config import load_config
from adiff_jax.train.inputs import HostBatches, clip_config, make_source
from adiff_jax.train.step import diffusion_loss, make_spec

# The tiny setup of test_train.py: 4 frames of 32x32 -> 8x8 latents, a one-level UNet.
COMMON = [
    "model=tiny", "dtype=f32", "seed=0", "data.source=synthetic", "data.num_examples=5",
    "data.synthetic_size=32", "data.synthetic_frames=8", "data.sample_size=32",
    "data.sample_stride=2", "data.sample_n_frames=4", "data.num_shards=2", "data.num_threads=1",
    "log.progress=false", "log.tensorboard=false", "batch_size=2", "export.at_end=false",
    "checkpoint.every=0", "model_overrides={unet: {layers_per_block: 1, block_out_channels: [32], "
    "cross_attention_levels: [true]}}", "compiler_options={xla_backend_optimization_level: 0}",
]


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
  cfg = load_config(None, COMMON)
  out = tmp_path_factory.mktemp("pre") / "latents"
  # 5 examples in shards of 2: exercises the padded last encoder batch and a partial shard.
  precompute(cfg, str(out), text=True, batch_size=4, shard_size=2, progress=False)
  return cfg, out


def test_stored_equals_direct_encode(pre):
  cfg, out = pre
  src = PrecomputedSource(str(out))
  manifest = json.loads((out / "manifest.json").read_text())
  assert len(src) == manifest["num_records"] == 5 and len(manifest["shards"]) == 3
  assert manifest["dtype"] == "float16" and manifest["text_embeddings"]
  base = S.load_base(cfg)
  spec = make_spec(cfg, base.config)
  s = base.config.vae.scaling_factor
  assert manifest["scaling_factor"] == s
  tok = CLIPTokenizer.default()
  for i, ex in sampled_clips(make_source(cfg.data), clip_config(cfg), 0, 5):
    rec = src[i]
    assert rec["latent_mean"].dtype == np.float16 and rec["text"] == ex["text"]
    post = spec.vae.apply({"params": base.params["vae"]}, ex["video"], method=type(spec.vae).encode)
    np.testing.assert_allclose(rec["latent_mean"], np.asarray(post.mean) * s, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(rec["latent_std"], np.asarray(post.std) * s, rtol=2e-3, atol=2e-4)
    emb = spec.text.apply({"params": base.params["text_encoder"]}, tok([ex["text"]]))[0]
    np.testing.assert_allclose(rec["text_emb"], np.asarray(emb), rtol=2e-3, atol=2e-3)
  empty = spec.text.apply({"params": base.params["text_encoder"]}, tok([""]))[0]
  np.testing.assert_allclose(src.empty_text_emb, np.asarray(empty), rtol=2e-3, atol=2e-3)


def test_loss_on_precomputed_equals_raw(pre):
  cfg, out = pre
  base = S.load_base(cfg)
  spec = make_spec(cfg, base.config)
  _, ex = next(sampled_clips(make_source(cfg.data), clip_config(cfg), 0, 1))
  rec = PrecomputedSource(str(out))[0]
  raw = {"video": ex["video"][None], "ids": CLIPTokenizer.default()([ex["text"]])}
  stored = {k: rec[k][None] for k in ("latent_mean", "latent_std", "text_emb")}
  loss = jax.jit(lambda b, k: diffusion_loss(spec, base.params, b, k)[0])
  key = jax.random.key(3)           # the same posterior noise, timestep and diffusion noise
  np.testing.assert_allclose(float(loss(stored, key)), float(loss(raw, key)), rtol=5e-3)


def test_trains_on_precomputed(pre, tmp_path):
  from adiff_jax.train.loop import Trainer
  _, out = pre
  cfg = load_config(None, COMMON + ["data.source=precomputed", f"data.precomputed_dir={out}",
                                    f"output_dir={tmp_path}", "steps=2", "optim.learning_rate=1e-3"])
  tr = Trainer(cfg)
  state = tr.batches.get_state()
  batch = next(tr.batches)
  assert set(batch) == {"latent_mean", "latent_std", "text_emb", "text"}
  assert batch["latent_mean"].shape == (2, 4, 8, 8, 4)
  tr.batches.set_state(state)       # the loader state round-trips like a raw source's
  np.testing.assert_array_equal(next(tr.batches)["latent_mean"], batch["latent_mean"])
  tr.batches.set_state(state)
  hist = tr.run()
  tr.close()
  assert len(hist) == 2 and all(h["finite"] and np.isfinite(h["loss"]) for h in hist)
  bad = load_config(None, COMMON + ["data.source=precomputed", f"data.precomputed_dir={out}",
                                    "data.sample_n_frames=2"])
  with pytest.raises(ValueError, match="precompute again"):
    HostBatches(bad, 2, 0, 1)
