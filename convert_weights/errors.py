"""One error type for every conversion failure, with short key listings (the CLI prints one line)."""
from __future__ import annotations

from typing import Iterable

from adiff_jax.errors import InputError


class ConversionError(InputError):
  """A checkpoint could not be read, recognised or converted; the message says why."""


def few(keys: Iterable[str], n: int = 5) -> str:
  """'a, b, c, ... (12 in all)': the first few of a key list and the count."""
  keys = sorted(keys)
  head = ", ".join(keys[:n])
  return f"{head}{', ...' if len(keys) > n else ''} ({len(keys)} in all)"


def check_keys(what: str, missing: Iterable[str], unexpected: Iterable[str]) -> None:
  missing, unexpected = list(missing), list(unexpected)
  parts = []
  if missing:
    parts.append(f"missing keys: {few(missing)}")
  if unexpected:
    parts.append(f"unexpected keys: {few(unexpected)}")
  if parts:
    raise ConversionError(f"{what}: " + "; ".join(parts))
