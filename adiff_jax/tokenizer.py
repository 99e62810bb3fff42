"""CLIP BPE tokenizer with the SD1.x / SDXL conventions, fully offline.

Produces the same ids as transformers' `CLIPTokenizer` (v5, `tokenizers` backend) with
`pad_token="<|endoftext|>"` (SD1.x, SDXL `tokenizer/`) or `pad_token="!"` (SDXL `tokenizer_2/`),
`padding="max_length"`, `max_length=77`, `truncation=True`:

    [bos=49406] + BPE tokens (at most 75) + [eos=49407] + padding up to 77 (49407, or 0 for "!")

Text pipeline (mirrors the `tokenizers` graph transformers builds for CLIP):
  1. the literal special tokens `<|startoftext|>` / `<|endoftext|>` (and the pad token: with
     pad "!", every "!" of the prompt) are cut out of the raw text first (case-sensitive) and
     map to their ids;
  2. every other segment: Unicode NFC, runs of whitespace -> one space, lower-case;
  3. split into words: `<|..|>` literals, contractions ('s 't 're 've 'm 'll 'd), runs of
     letters, single digits, runs of anything else; whitespace is dropped;
  4. each word is split again by the GPT-2 byte-level pattern, mapped byte-wise to printable
     unicode characters and BPE-merged with `</w>` marking the end of the word.
Prompt-weight syntax such as "(word:1.2)" is not interpreted: it is tokenized as text.

The built-in vocabulary is OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` (see
`adiff_jax/assets/NOTICE`).
"""
from __future__ import annotations

import gzip
import json
import os
import unicodedata
import warnings
from importlib import resources
from typing import Optional, Sequence

import numpy as np
import regex
from adiff_jax.errors import InputError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
ASSET_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP uses the first 49152 - 256 - 2 merges of the file (line 0 is a version header).
NUM_MERGES = 49152 - 256 - 2

# Unicode White_Space, written out: Python's `\s` also matches \x1c-\x1f, which CLIP keeps.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WS_RUN = regex.compile(f"[{_WS}]+")
_SPECIAL = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WORDS = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}"
    f"|[^{_WS}\\p{{L}}\\p{{N}}]+")
# GPT-2 byte-level split (applied by `tokenizers`' ByteLevel pre-tokenizer on each word).
_BYTE_LEVEL = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"
    f"| ?[^{_WS}\\p{{L}}\\p{{N}}]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+")


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP reversible byte -> printable unicode character table (256 entries)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:  # control/space bytes go to code points 256+ so every byte has a visible symbol
      table[b] = chr(256 + extra)
      extra += 1
  # CLIP orders the vocabulary: printable bytes first, then the shifted ones.
  return {b: table[b] for b in printable + [b for b in range(256) if b not in printable]}


def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
  """CLIP's vocabulary: 256 byte symbols, the same with `</w>`, one token per merge, bos, eos."""
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
  tokens += [BOS_TOKEN, EOS_TOKEN]
  return {t: i for i, t in enumerate(tokens)}


def _parse_merges(lines: Sequence[str]) -> list[tuple[str, str]]:
  merges = []
  for line in lines:
    if not line.strip() or line.startswith("#version"):
      continue
    parts = line.split()
    if len(parts) != 2:
      raise InputError(f"malformed merges line: {line!r}")
    merges.append((parts[0], parts[1]))
  return merges


def load_builtin_merges() -> list[tuple[str, str]]:
  """The first `NUM_MERGES` merges of the packaged `bpe_simple_vocab_16e6.txt.gz`."""
  data = resources.files("adiff_jax").joinpath("assets", ASSET_NAME).read_bytes()
  lines = gzip.decompress(data).decode("utf-8").split("\n")
  return _parse_merges(lines[1:NUM_MERGES + 1])  # line 0 is the version header


def _token_content(value) -> Optional[str]:
  """A special token as tokenizer files store it: a string or {"content": ...} (AddedToken)."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def read_pad_token(folder: str) -> Optional[str]:
  """The pad token a transformers tokenizer folder declares: `special_tokens_map.json`, which
  transformers lets override `tokenizer_config.json`, then `tokenizer_config.json`; None if
  neither names one."""
  for name in ("special_tokens_map.json", "tokenizer_config.json"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      try:
        with open(path, encoding="utf-8") as f:
          pad = _token_content(json.load(f).get("pad_token"))
      except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise InputError(f"{path}: unreadable tokenizer file ({e})") from None
      if pad is not None:
        return pad
  return None


class CLIPTokenizer:
  """Text -> (B, 77) int32 CLIP token ids: bos, text, eos, then `pad_token` up to 77.

  pad_token: "<|endoftext|>" (SD1.x and SDXL's first tokenizer) or "!" (id 0: SDXL's
  `tokenizer_2`, OpenCLIP's zero padding); any token of the vocabulary.
  """

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
               max_length: int = MAX_LENGTH, pad_token: str = EOS_TOKEN):
    if max_length < 2:
      raise InputError(f"max_length must be >= 2 (bos + eos), got {max_length}")
    for tok in (BOS_TOKEN, EOS_TOKEN):
      if tok not in vocab:
        raise InputError(f"vocabulary has no {tok!r}")
    if pad_token not in vocab:
      raise InputError(f"pad_token {pad_token!r} is not in the vocabulary")
    self.encoder = dict(vocab)
    self.merges = [tuple(m) for m in merges]
    self.ranks = {m: i for i, m in enumerate(self.merges)}
    self.byte_encoder = bytes_to_unicode()
    self.bos_id = self.encoder[BOS_TOKEN]
    self.eos_id = self.encoder[EOS_TOKEN]
    self.pad_token = pad_token
    self.pad_id = self.encoder[pad_token]  # SD1.x pads with eos, SDXL's tokenizer_2 with "!" (0)
    # Special tokens are cut out of the raw text first. transformers registers the pad token as
    # one too, so with pad "!" every "!" of a prompt becomes id 0, never merged ("cat!!" ->
    # cat</w> 0 0): SDXL tokenizer_2's ids in diffusers.
    self.special_tokens = tuple(dict.fromkeys((BOS_TOKEN, EOS_TOKEN, pad_token)))
    self._special = (_SPECIAL if pad_token in (BOS_TOKEN, EOS_TOKEN) else regex.compile(
        "(" + "|".join(regex.escape(t) for t in (BOS_TOKEN, EOS_TOKEN, pad_token)) + ")"))
    self.max_length = max_length
    self._cache: dict[str, list[int]] = {}  # per instance: words repeat a lot across prompts

  @classmethod
  def default(cls, pad: str = EOS_TOKEN) -> "CLIPTokenizer":
    """The built-in OpenAI CLIP vocabulary (bos 49406, eos 49407, 49408 tokens); pad="!" gives
    SDXL's tokenizer_2."""
    merges = load_builtin_merges()
    return cls(vocab_from_merges(merges), merges, pad_token=pad)

  @classmethod
  def from_pretrained(cls, folder: str | os.PathLike, subfolder: str = "tokenizer",
                      pad_token: Optional[str] = None) -> "CLIPTokenizer":
    """Load `vocab.json` + `merges.txt` from `folder/<subfolder>/` (diffusers layout: "tokenizer",
    SDXL also "tokenizer_2") or `folder/`. The pad token is `pad_token` if given, else what the
    folder's special_tokens_map.json / tokenizer_config.json say, else eos."""
    folder = os.fspath(folder)
    sub = os.path.join(folder, subfolder)
    root = sub if os.path.isfile(os.path.join(sub, "vocab.json")) else folder
    vocab_path, merges_path = os.path.join(root, "vocab.json"), os.path.join(root, "merges.txt")
    for path in (vocab_path, merges_path):
      if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP tokenizer file not found: {path} "
                                f"(looked in {sub} and {folder})")
    with open(vocab_path, encoding="utf-8") as f:
      vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
      merges = _parse_merges(f.read().split("\n"))
    return cls(vocab, merges, pad_token=pad_token or read_pad_token(root) or EOS_TOKEN)

  def save_pretrained(self, folder: str | os.PathLike) -> None:
    """Write `vocab.json` + `merges.txt` + `special_tokens_map.json` + `tokenizer_config.json`
    (transformers/diffusers format; the last two carry the pad token and max length) into `folder`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(self.encoder, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
               "pad_token": self.pad_token}
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
      json.dump(special, f, ensure_ascii=False, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, **special},
                f, ensure_ascii=False, indent=2)

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  def _bpe(self, word: str) -> list[int]:
    """BPE-merge one byte-encoded word; the last symbol carries the `</w>` marker."""
    if word in self._cache:
      return self._cache[word]
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      # Merge the lowest-ranked adjacent pair everywhere it occurs, left to right.
      pairs = {(a, b) for a, b in zip(parts, parts[1:])}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    ids = [self.encoder[p] for p in parts]  # every byte symbol is in the vocab: no unknowns
    self._cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` without bos/eos, padding or truncation."""
    if not isinstance(text, str):
      raise TypeError(f"prompt must be str, got {type(text).__name__}")
    ids: list[int] = []
    for segment in self._special.split(text):
      if segment in self.special_tokens:
        ids.append(self.encoder[segment])
        continue
      segment = _WS_RUN.sub(" ", unicodedata.normalize("NFC", segment)).lower()
      for word in _WORDS.findall(segment):
        for piece in _BYTE_LEVEL.findall(word):
          ids.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
    return ids

  def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
    """prompts: one string or a list of strings -> ids (B, max_length) int32."""
    if isinstance(prompts, str):
      prompts = [prompts]
    elif not isinstance(prompts, (list, tuple)):
      raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
      if not isinstance(p, str):
        raise TypeError(f"prompts[{i}] must be str, got {type(p).__name__}")
    room = self.max_length - 2
    out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
    for i, p in enumerate(prompts):
      ids = self.encode(p)
      if len(ids) > room:
        warnings.warn(f"prompt {i} is {len(ids)} tokens long; {len(ids) - room} tokens beyond "
                      f"the first {room} were dropped (CLIP context is {self.max_length})",
                      stacklevel=2)
        ids = ids[:room]
      row = [self.bos_id] + ids + [self.eos_id]
      out[i, :len(row)] = row
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """Best-effort inverse for debugging: drops bos/eos and the padding after the last eos,
    `</w>` -> space."""
    inv = {v: k for k, v in self.encoder.items()}
    byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:len(ids) - ids[::-1].index(self.eos_id)]
    text = "".join(inv[i] for i in ids if i not in (self.bos_id, self.eos_id))
    raw = bytearray()
    for chunk in text.split("</w>"):
      raw.extend(byte_decoder.get(c, ord("?")) for c in chunk)
      raw.extend(b" ")
    return raw.decode("utf-8", errors="replace").strip()
