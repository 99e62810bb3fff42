"""Verify (or re-create) adiff_jax/assets/bpe_simple_vocab_16e6.txt.gz, the CLIP BPE merges.

  python tools/make_bpe_asset.py --check                    # sha256 + vocabulary sanity
  python tools/make_bpe_asset.py --from-wheel WHEEL.whl     # extract from open_clip_torch
  python tools/make_bpe_asset.py --export-hf DIR            # write vocab.json + merges.txt

The wheel comes from `pip download --no-deps open_clip_torch -d /tmp/oc` (do not install it).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(ROOT, "adiff_jax", "assets", "bpe_simple_vocab_16e6.txt.gz")
SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def check() -> None:
  with open(ASSET, "rb") as f:
    digest = sha256(f.read())
  if digest != SHA256:
    sys.exit(f"{ASSET}: sha256 {digest} != expected {SHA256}")
  sys.path.insert(0, ROOT)
  from adiff_jax.tokenizer import CLIPTokenizer
  tok = CLIPTokenizer.default()
  assert tok.vocab_size == 49408, tok.vocab_size
  assert (tok.bos_id, tok.eos_id) == (49406, 49407), (tok.bos_id, tok.eos_id)
  assert tok("a photo of a cat")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
  print(f"ok: sha256 {digest}, vocab 49408, bos 49406, eos 49407")


def from_wheel(wheel: str) -> None:
  with zipfile.ZipFile(wheel) as z:
    data = z.read(WHEEL_MEMBER)
  if sha256(data) != SHA256:
    sys.exit(f"{wheel}:{WHEEL_MEMBER} has sha256 {sha256(data)}, expected {SHA256}")
  os.makedirs(os.path.dirname(ASSET), exist_ok=True)
  with open(ASSET, "wb") as f:
    f.write(data)
  print(f"wrote {ASSET}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--check", action="store_true")
  ap.add_argument("--from-wheel", metavar="WHEEL")
  ap.add_argument("--export-hf", metavar="DIR")
  args = ap.parse_args()
  if args.from_wheel:
    from_wheel(args.from_wheel)
  if args.export_hf:
    sys.path.insert(0, ROOT)
    from adiff_jax.tokenizer import CLIPTokenizer
    CLIPTokenizer.default().save_pretrained(args.export_hf)
    print(f"wrote {args.export_hf}/vocab.json, merges.txt")
  if args.check or not (args.from_wheel or args.export_hf):
    check()


if __name__ == "__main__":
  main()
