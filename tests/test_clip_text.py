"""CLIP text encoder: parity with transformers' CLIPTextModel (random weights), clip skip, errors."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from adiff_jax.clip_text import CLIPTextConfig, CLIPTextModel
from convert_weights.sd_base import tree_from_diffusers


def _hf_config(cfg: CLIPTextConfig):
  return transformers.CLIPTextConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_position_embeddings,
      layer_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act,
      bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, attn_implementation="eager")


def _params_from_torch(state_dict):
  """transformers CLIPTextModel state dict -> our params, by the converter's mapping."""
  return {"params": tree_from_diffusers(state_dict, "text_encoder")}


def _reference(cfg, seed=0):
  torch.manual_seed(seed)
  model = transformers.CLIPTextModel(_hf_config(cfg)).eval()
  # Default init has zero biases and unit norms; randomize them so the mapping is really tested.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model, _params_from_torch(model.state_dict())


def _ids(batch, length=77, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.full((batch, length), 49407, np.int32)
  for b in range(batch):
    n = int(rng.integers(0, length - 1))
    ids[b, 0] = 49406
    ids[b, 1:n + 1] = rng.integers(0, 49406, n)
  return ids


def _check(model, params, ref, ids, tol=1e-4):
  with torch.no_grad():
    out = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    want1 = out.last_hidden_state.numpy()
    want_pool = out.pooler_output.numpy()
    want2 = ref.final_layer_norm(out.hidden_states[-2]).numpy()
  apply = jax.jit(model.apply, static_argnames=("clip_skip", "return_pooled"))
  got1, pooled = apply(params, ids, return_pooled=True)
  got2 = apply(params, ids, clip_skip=2)
  for name, got, want in (("clip_skip=1", got1, want1), ("pooled", pooled, want_pool),
                          ("clip_skip=2", got2, want2)):
    err = float(np.max(np.abs(np.asarray(got) - want)))
    scale = float(np.max(np.abs(want)))
    print(f"{name}: max abs err {err:.3e} (output max abs {scale:.3f})")
    assert got.shape == want.shape
    assert err <= tol * max(1.0, scale), f"{name}: max abs err {err} vs scale {scale}"


def test_param_tree_mirrors_checkpoint():
  cfg = CLIPTextConfig.tiny()
  model = CLIPTextModel(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))
  flat = traverse_util.flatten_dict(shapes["params"], sep="/")
  ref, params = _reference(cfg)
  want = traverse_util.flatten_dict(params["params"], sep="/")
  assert sorted(flat) == sorted(want)
  for k in flat:
    assert flat[k].shape == want[k].shape, k
  assert "text_model/encoder/layers_1/self_attn/q_proj/kernel" in flat
  assert "text_model/embeddings/position_embedding/embedding" in flat
  assert "text_model/final_layer_norm/scale" in flat


def test_parity_tiny():
  cfg = CLIPTextConfig.tiny()
  ref, params = _reference(cfg)
  _check(CLIPTextModel(cfg), params, ref, _ids(3))


def test_parity_tiny_gelu_and_short_sequence():
  cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_layers=3, num_heads=4,
                       hidden_act="gelu")
  ref, params = _reference(cfg, seed=1)
  _check(CLIPTextModel(cfg), params, ref, _ids(2, length=20, seed=1))


def test_clip_skip_init_and_jit():
  cfg = CLIPTextConfig.tiny()
  model = CLIPTextModel(cfg)
  ids = _ids(2)
  # Init with clip_skip=2 still creates every layer's parameters.
  p2 = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, clip_skip=2))
  p1 = jax.jit(model.init)(jax.random.PRNGKey(0), ids)
  assert jax.tree.structure(p1) == jax.tree.structure(p2)
  # clip_skip is static (it changes the graph); every value in range compiles and differs.
  f = jax.jit(model.apply, static_argnames=("clip_skip",))
  assert not np.allclose(f(p1, ids, clip_skip=2), f(p1, ids))


def test_bf16_compute_f32_params():
  cfg = CLIPTextConfig.tiny()
  ids = _ids(2)
  params = jax.jit(CLIPTextModel(cfg).init)(jax.random.PRNGKey(0), ids)
  out = jax.jit(CLIPTextModel(cfg, dtype=jnp.bfloat16).apply)(params, ids)
  ref = jax.jit(CLIPTextModel(cfg).apply)(params, ids)
  assert out.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1


def test_errors():
  cfg = CLIPTextConfig.tiny()
  model = CLIPTextModel(cfg)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), _ids(1))
  with pytest.raises(ValueError, match="batch, seq_len"):
    model.apply(params, np.zeros((77,), np.int32))
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model.apply(params, np.zeros((1, 78), np.int32))
  with pytest.raises(TypeError, match="integer"):
    model.apply(params, np.zeros((1, 77), np.float32))
  for bad in (0, 3, 1.0, True):
    with pytest.raises(ValueError, match="clip_skip"):
      model.apply(params, _ids(1), clip_skip=bad)
  with pytest.raises(ValueError, match="divisible"):
    CLIPTextConfig(hidden_size=30, num_heads=4)
  with pytest.raises(ValueError, match="hidden_act"):
    CLIPTextConfig(hidden_act="relu")


@pytest.mark.slow
def test_parity_sd15_full_size():
  cfg = CLIPTextConfig.sd15()
  ref, params = _reference(cfg)
  _check(CLIPTextModel(cfg), params, ref, _ids(2))
