"""SDXL text side: the second text encoder (OpenCLIP bigG as transformers'
CLIPTextModelWithProjection), `encode_sdxl` against diffusers' StableDiffusionXLPipeline.encode_prompt,
tokenizer_2 ("!" padding) against transformers' CLIPTokenizer; the SDXL ModelConfig."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from adiff_jax.clip_text import CLIPTextConfig, CLIPTextModel
from adiff_jax.errors import InputError
from adiff_jax.model import ModelConfig, PARTS, param_shapes, random_params
from adiff_jax.params import flatten
from adiff_jax.sdxl_text import encode_sdxl, hidden_state_index, sdxl_tokenizers, time_ids
from adiff_jax.tokenizer import CLIPTokenizer
from convert_weights.sd_base import tree_from_diffusers
from test_tokenizer import PROMPTS
from torch_ref import randomize_

TINY = ModelConfig.tiny_sdxl()


def hf_text_config(cfg: CLIPTextConfig, eos_token_id=2):
  """transformers config of ours; eos_token_id 2 is what SDXL's (and SD1.5's) configs carry."""
  kw = dict(projection_dim=cfg.projection_dim) if cfg.projection_dim else {}
  return transformers.CLIPTextConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
      hidden_act=cfg.hidden_act, bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1, **kw)


def hf_text_model(cfg: CLIPTextConfig, seed: int, eos_token_id=2):
  cls = transformers.CLIPTextModelWithProjection if cfg.projection_dim else transformers.CLIPTextModel
  return randomize_(cls(hf_text_config(cfg, eos_token_id)), seed).eval()


def ours(model) -> dict:
  return tree_from_diffusers(model.state_dict(), "text_encoder")


def close(got, want, tol=1e-5, what=""):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err, scale = np.abs(got - want).max(), np.abs(want).max()
  print(f"{what}: max abs err {err:.2e} (scale {scale:.2f})")
  assert err <= tol * max(1.0, scale), what


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
  d = tmp_path_factory.mktemp("sdxl_tok")
  CLIPTokenizer.default().save_pretrained(d / "tokenizer")
  CLIPTokenizer.default(pad="!").save_pretrained(d / "tokenizer_2")
  return d


# ---------------------------------------------------------------- tokenizer_2
def test_tokenizer_2_matches_transformers(tok_dirs):
  """Built-in vocabulary with "!" padding = transformers' CLIPTokenizer(pad_token="!")."""
  ours_2 = CLIPTokenizer.default(pad="!")
  hf = transformers.CLIPTokenizer.from_pretrained(str(tok_dirs / "tokenizer"), pad_token="!")
  with pytest.warns(UserWarning, match="dropped"):
    got = ours_2(PROMPTS)
  want = np.asarray(hf(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"], np.int32)
  np.testing.assert_array_equal(got, want)
  assert ours_2.pad_id == 0 and (got[0, 2:] == 0).all() and got[0, 1] == 49407
  # Same ids as the eos-padded tokenizer up to and including the eos (prompts without "!") ...
  eos = CLIPTokenizer.default()(PROMPTS[:2])
  for a, b in zip(got[:2], eos):
    n = list(b).index(49407) + 1
    assert (a[:n] == b[:n]).all() and (b[n:] == 49407).all() and (a[n:] == 0).all()
  assert ours_2.decode(got[1]) == "a photo of a cat"
  # ... but the pad token is a special token: every "!" of a prompt is id 0, never merged
  cat = CLIPTokenizer.default().encode("cat")
  assert list(ours_2(["cat!!"])[0, :5]) == [49406] + cat + [0, 0, 49407]
  assert CLIPTokenizer.default().encode("cat!!") != cat + [0, 0]


def test_tokenizer_folders_carry_the_pad_token(tok_dirs, tmp_path):
  """save_pretrained writes the pad token where transformers reads it, and from_pretrained reads it."""
  hf = transformers.CLIPTokenizer.from_pretrained(str(tok_dirs / "tokenizer_2"))
  assert hf.pad_token == "!" and hf.model_max_length == 77
  assert transformers.CLIPTokenizer.from_pretrained(str(tok_dirs / "tokenizer")).pad_token == "<|endoftext|>"
  tok, tok_2 = sdxl_tokenizers(str(tok_dirs))
  assert (tok.pad_id, tok_2.pad_id) == (49407, 0)
  want = np.asarray(hf(PROMPTS[:4], padding="max_length", max_length=77, truncation=True)["input_ids"])
  np.testing.assert_array_equal(tok_2(PROMPTS[:4]), want)
  assert CLIPTokenizer.from_pretrained(str(tok_dirs), "tokenizer_2", pad_token="<|endoftext|>").pad_id == 49407
  # The hub's files: AddedToken dicts; special_tokens_map.json wins over tokenizer_config.json.
  d = tmp_path / "tok"
  CLIPTokenizer.default().save_pretrained(d)
  (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "lstrip": False}}))
  (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
  assert CLIPTokenizer.from_pretrained(str(d)).pad_id == 0
  assert transformers.CLIPTokenizer.from_pretrained(str(d)).pad_token == "!"
  (d / "special_tokens_map.json").unlink()
  assert CLIPTokenizer.from_pretrained(str(d)).pad_id == 49407
  b = sdxl_tokenizers(None)
  assert (b[0].pad_id, b[1].pad_id) == (49407, 0)
  with pytest.raises(InputError, match="not in the vocabulary"):
    CLIPTokenizer.default(pad="<pad>")


# ---------------------------------------------------------------- text encoder 2
BIGG_TINY = CLIPTextConfig(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                           hidden_act="gelu", projection_dim=24)


def _ids(seed=0):
  """tokenizer_2 output plus random ids (with eos, "!" padding)."""
  rng = np.random.default_rng(seed)
  ids = CLIPTokenizer.default(pad="!")(["a photo of a cat", "", "(masterpiece:1.2) a dog!!"])
  rand = np.zeros((1, 77), np.int32)
  n = int(rng.integers(5, 70))
  rand[0, 0], rand[0, 1:n], rand[0, n] = 49406, rng.integers(1, 49406, n - 1), 49407
  return np.concatenate([ids, rand])


def test_text_encoder_2_matches_transformers_with_projection():
  ref = hf_text_model(BIGG_TINY, seed=5)
  params = ours(ref)
  assert sorted(flatten(params)) == sorted(flatten(param_shapes(BIGG_TINY)))
  assert params["text_projection"]["kernel"].shape == (32, 24)
  ids = _ids()
  with torch.no_grad():
    out = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
  f, p = CLIPTextModel(BIGG_TINY).apply, {"params": params}   # eager: faster than compiling 4 graphs
  h2, embeds = f(p, ids, return_pooled=True, hidden_state=2)
  close(h2, out.hidden_states[-2], what="hidden_states[-2]")
  close(embeds, out.text_embeds, what="text_embeds")
  close(f(p, ids, hidden_state=4), out.hidden_states[0], what="hidden_states[0] (embeddings)")
  close(f(p, ids), out.last_hidden_state, what="last_hidden_state")
  # pooled is always the last layer's, whatever state is returned beside it
  skip2, embeds_2 = f(p, ids, clip_skip=2, return_pooled=True)
  close(skip2, ref.text_model.final_layer_norm(out.hidden_states[-2]).detach(), what="clip_skip=2")
  close(embeds_2, out.text_embeds, what="text_embeds (clip_skip=2)")
  # transformers' first-eos rule (eos_token_id 49407) picks the same positions on tokenizer output
  ref.config.eos_token_id = ref.text_model.eos_token_id = 49407
  with torch.no_grad():
    close(embeds, ref(torch.from_numpy(ids).long()).text_embeds, what="text_embeds, first-eos rule")


def test_hidden_state_errors_and_sd15_tree():
  model = CLIPTextModel(CLIPTextConfig.tiny())
  params = {"params": param_shapes(CLIPTextConfig.tiny())}     # the errors come before any compute
  assert "text_projection" not in params["params"]           # SD1.5 tree unchanged
  for bad in (0, 4, True, 2.0):
    with pytest.raises(InputError, match="hidden_state"):
      model.apply(params, _ids()[:1], hidden_state=bad)
  with pytest.raises(InputError, match="not both"):
    model.apply(params, _ids()[:1], clip_skip=2, hidden_state=2)
  with pytest.raises(InputError, match="projection_dim"):
    CLIPTextConfig(projection_dim=0)


# ---------------------------------------------------------------- encode_sdxl vs diffusers
@pytest.fixture(scope="module")
def sdxl_pipe(tok_dirs):
  from diffusers import StableDiffusionXLPipeline
  te1, te2 = hf_text_model(TINY.text, 1), hf_text_model(TINY.text_2, 2)
  pipe = StableDiffusionXLPipeline(
      vae=None, unet=None, scheduler=None, text_encoder=te1, text_encoder_2=te2,
      tokenizer=transformers.CLIPTokenizer.from_pretrained(str(tok_dirs / "tokenizer")),
      tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(tok_dirs / "tokenizer_2")))
  return pipe, {"text_encoder": ours(te1), "text_encoder_2": ours(te2)}


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_encode_sdxl_matches_diffusers_encode_prompt(sdxl_pipe, tok_dirs, clip_skip):
  pipe, params = sdxl_pipe
  prompts, negative = ["a red circle", "a photo of a cat, best quality"], ["ugly", ""]
  with torch.no_grad():
    ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(
        prompts, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative,
        clip_skip=clip_skip)
  tok, tok_2 = sdxl_tokenizers(str(tok_dirs))
  enc = encode_sdxl   # eager (tiny): faster than compiling
  m1, m2 = CLIPTextModel(TINY.text), CLIPTextModel(TINY.text_2)
  got_ctx, got_pooled = enc(m1, params["text_encoder"], m2, params["text_encoder_2"], tok(prompts),
                            tok_2(prompts), clip_skip=clip_skip)
  assert got_ctx.shape == (2, 77, TINY.unet.cross_attention_dim) and got_pooled.shape == (2, 16)
  close(got_ctx, ctx, what=f"context, clip_skip={clip_skip}")
  close(got_pooled, pooled, what=f"pooled, clip_skip={clip_skip}")
  # diffusers encodes negative prompts with hidden_states[-2] whatever clip_skip is
  n_ctx, n_pooled = enc(m1, params["text_encoder"], m2, params["text_encoder_2"], tok(negative),
                        tok_2(negative))
  close(n_ctx, neg_ctx, what="negative context")
  close(n_pooled, neg_pooled, what="negative pooled")


def test_encode_sdxl_errors_and_helpers():
  p1, p2 = None, None   # every error comes before the encoders run
  m1, m2 = CLIPTextModel(TINY.text), CLIPTextModel(TINY.text_2)
  ids = CLIPTokenizer.default()(["a"])
  with pytest.raises(InputError, match="projection_dim"):
    encode_sdxl(m1, p1, m1, p1, ids, ids)
  with pytest.raises(InputError, match="same shape"):
    encode_sdxl(m1, p1, m2, p2, ids, ids[:, :10])
  with pytest.raises(InputError, match=r"hidden_states\[-4\]"):
    encode_sdxl(m1, p1, m2, p2, ids, ids, clip_skip=2)   # 2-layer first encoder
  assert [hidden_state_index(c) for c in (None, 0, 1, 3)] == [2, 2, 3, 5]
  with pytest.raises(InputError, match="clip_skip"):
    hidden_state_index(-1)
  np.testing.assert_array_equal(time_ids((1024, 768)), [1024, 768, 0, 0, 1024, 768])
  np.testing.assert_array_equal(time_ids((512, 512), (16, 8), (1024, 1024)), [512, 512, 16, 8, 1024, 1024])
  with pytest.raises(InputError, match="pairs"):
    time_ids((1024,))


# ---------------------------------------------------------------- ModelConfig
def test_sdxl_model_config():
  full = ModelConfig.sdxl()
  assert full.parts == PARTS + ("text_encoder_2",) and ModelConfig.sd15().parts == PARTS
  assert full.is_sdxl and not ModelConfig.tiny().is_sdxl
  assert full.text == CLIPTextConfig.sd15() and full.text_2 == CLIPTextConfig.sdxl_bigg()
  assert full.vae.scaling_factor == 0.13025 and full.size_multiple == 32
  assert ModelConfig.sdxl(motion=None).motion is None
  params = random_params(TINY, seed=3)   # SD1.5 parts keep their seeds: text_encoder_2 comes last
  assert list(params) == ["unet", "text_encoder", "vae", "text_encoder_2"]
  assert jax.tree.structure(params["text_encoder_2"]) == jax.tree.structure(param_shapes(TINY.text_2))
  assert params["text_encoder_2"]["text_projection"]["kernel"].shape == (16, 16)
  assert params["unet"]["add_embedding"]["linear_1"]["kernel"].shape == (64, 128)
  with pytest.raises(InputError, match="context channels"):
    ModelConfig(TINY.unet, None, CLIPTextConfig.tiny(), TINY.vae, TINY.text_2)
  with pytest.raises(InputError, match="pooled text of width 16"):
    ModelConfig(TINY.unet, None, TINY.text, TINY.vae, CLIPTextConfig(hidden_size=16, num_heads=2))


@pytest.mark.slow
def test_full_size_bigg_tree_matches_transformers():
  """CLIPTextConfig.sdxl_bigg() vs transformers' CLIPTextModelWithProjection with SDXL's
  text_encoder_2 config, shapes only (torch meta device, eval_shape)."""
  cfg = CLIPTextConfig.sdxl_bigg()
  with torch.device("meta"):
    ref = transformers.CLIPTextModelWithProjection(hf_text_config(cfg))
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
  from convert_weights.tree import path_to_torch_key, torch_shape
  got = {path_to_torch_key(tuple(p.split("/"))): torch_shape(p, s.shape)
         for p, s in flatten(param_shapes(cfg)).items()}
  got = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
         for k, v in got.items()}
  assert got == want
  n = sum(int(np.prod(s)) for s in got.values())
  print(f"SDXL text_encoder_2: {n:,} parameters")
  assert n == sum(p.numel() for p in ref.parameters()) == 694_659_840
