"""CLIP BPE tokenizer: ids identical to transformers' CLIPTokenizer (SD1.x settings), errors."""
import gzip
import hashlib
import warnings
from importlib import resources

import numpy as np
import pytest

from adiff_jax.tokenizer import CLIPTokenizer, vocab_from_merges, load_builtin_merges

ASSET_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT, Masterpiece!!!",
    "hello... world?! (yes) [no] {maybe} <tag> #hash @at $5 100% a&b a_b a-b a/b",
    "it's, we're, they've, I'm, you'll, he'd, DON'T ''s",
    "caf\u00e9 cafe\u0301 na\u00efve \u00c5NGSTR\u00d6M stra\u00dfe \u0130stanbul",  # NFC + lower
    "\u6771\u4eac\u306e\u591c \u5168\u89d2\u3000\u30b9\u30da\u30fc\u30b9 \ud55c\uad6d\uc5b4",  # CJK
    "\U0001f431\U0001f680 \U0001f469\u200d\U0001f469\u200d\U0001f467 \U0001f1ef\U0001f1f5 \u2764\ufe0f",
    "  many   spaces\n\nnew\tlines\r\n\ttabs  \u00a0nbsp\u2003em ",
    "x\x1cy\x00z\x7f\ufeff",  # control chars: not whitespace for CLIP
    "1,000,000.50 3.14e-10 2024-01-01 \u00bd \u00b2 \u216b",
    "(masterpiece:1.2), [bad], ((best quality)), (worst quality:0.7), <lora:foo:0.8>",
    "a <|endoftext|> b<|startoftext|>c <|ENDOFTEXT|>",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "a photo of " + "very " * 100 + "long prompt",  # > 77 tokens
]


@pytest.fixture(scope="module")
def tok():
  return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory, tok):
  d = tmp_path_factory.mktemp("clip_vocab")
  tok.save_pretrained(d)
  return d


@pytest.fixture(scope="module")
def hf_tok(vocab_dir):
  transformers = pytest.importorskip("transformers")
  return transformers.CLIPTokenizer.from_pretrained(str(vocab_dir), pad_token="<|endoftext|>")


def _hf_ids(hf_tok, prompts):
  out = hf_tok(prompts, padding="max_length", max_length=77, truncation=True)
  return np.asarray(out["input_ids"], np.int32)


def test_builtin_vocabulary(tok):
  data = resources.files("adiff_jax").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
  assert hashlib.sha256(data).hexdigest() == ASSET_SHA256
  assert gzip.decompress(data).startswith(b'"bpe_simple_vocab_16e6.txt#version: 0.2\n')
  assert tok.vocab_size == 49408
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 49407)
  merges = load_builtin_merges()
  assert len(merges) == 49152 - 256 - 2
  vocab = vocab_from_merges(merges)
  assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512


def test_known_ids(tok):
  ids = tok("a photo of a cat")
  assert ids.shape == (1, 77) and ids.dtype == np.int32
  assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
  assert (ids[0, 7:] == 49407).all()


def test_empty_prompt(tok):
  ids = tok("")[0]
  assert ids[0] == 49406 and (ids[1:] == 49407).all()


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_matches_transformers(tok, hf_tok, i):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    got = tok(PROMPTS[i])
  np.testing.assert_array_equal(got, _hf_ids(hf_tok, [PROMPTS[i]]), err_msg=repr(PROMPTS[i]))


def test_batch_matches_transformers(tok, hf_tok):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    got = tok(PROMPTS)
  assert got.shape == (len(PROMPTS), 77)
  np.testing.assert_array_equal(got, _hf_ids(hf_tok, PROMPTS))
  np.testing.assert_array_equal(tok(tuple(PROMPTS[:3])), got[:3])


def test_truncation_warns(tok):
  prompt = "a photo of " + "very " * 100 + "long prompt"
  n = len(tok.encode(prompt))
  assert n == 105
  with pytest.warns(UserWarning, match=f"{n - 75} tokens"):
    ids = tok(["short", prompt])
  assert ids[1, 0] == 49406 and ids[1, 76] == 49407 and (ids[1, 1:76] != 49407).all()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # exactly 75 tokens: no warning
    ids = tok("a " * 75)
  assert ids[0, 76] == 49407 and ids[0, 75] == 320


def test_weights_syntax_is_plain_text(tok):
  assert tok.encode("(masterpiece:1.2)") == (
      tok.encode("(") + tok.encode("masterpiece") + tok.encode(":") + tok.encode("1")
      + tok.encode(".") + tok.encode("2") + tok.encode(")"))


def test_from_pretrained_diffusers_layout(tmp_path, tok, vocab_dir):
  (tmp_path / "tokenizer").mkdir()
  for name in ("vocab.json", "merges.txt"):
    (tmp_path / "tokenizer" / name).write_bytes((vocab_dir / name).read_bytes())
  for folder in (tmp_path, tmp_path / "tokenizer", vocab_dir):
    loaded = CLIPTokenizer.from_pretrained(folder)
    assert loaded.encoder == tok.encoder and loaded.merges == tok.merges
    np.testing.assert_array_equal(loaded(PROMPTS[:4]), tok(PROMPTS[:4]))


def test_decode_roundtrip(tok):
  assert tok.decode(tok("A photo of a Cat!")[0]) == "a photo of a cat !"


def test_errors(tmp_path, tok):
  with pytest.raises(TypeError, match="str"):
    tok(123)
  with pytest.raises(TypeError, match=r"prompts\[1\]"):
    tok(["ok", None])
  with pytest.raises(TypeError, match="str"):
    tok.encode(b"bytes")
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    CLIPTokenizer.from_pretrained(tmp_path)
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="merges.txt"):
    CLIPTokenizer.from_pretrained(tmp_path)
