"""The one config (de)serialiser: frozen dataclasses <-> plain dicts (YAML, metadata.json).

Unknown keys are errors that name the key and where it was read, so a typo never silently
falls back to a default. Nested dataclass fields recurse; lists become tuples.
"""
from __future__ import annotations

import dataclasses
import types
import typing

from adiff_jax.errors import InputError


def to_dict(cfg) -> dict:
  """Dataclass -> plain JSON/YAML-able dict (tuples -> lists)."""
  def conv(v):
    if dataclasses.is_dataclass(v):
      return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (tuple, list)):
      return [conv(x) for x in v]
    if isinstance(v, dict):
      return {k: conv(x) for k, x in v.items()}
    return v
  return conv(cfg)


def from_dict(cls, d: dict, where: str = "config", prefix: str = "", ignore: frozenset = frozenset()):
  """Nested dict -> dataclass `cls`. where: the file (for messages); prefix: the dotted path
  of a nested section; ignore: keys accepted and dropped (formats written by older versions)."""
  if not isinstance(d, dict):
    raise InputError(f"{where}: {prefix or cls.__name__} must be a mapping, got {type(d).__name__}")
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names - set(ignore))
  if unknown:
    raise InputError(f"{where}: unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                     f"valid: {', '.join(sorted(names))}")
  kw = {}
  for k, v in d.items():
    if k not in names:
      continue
    t = hints[k]
    if dataclasses.is_dataclass(t):
      kw[k] = from_dict(t, v or {}, where, f"{prefix}{k}.")
    else:
      kw[k] = _coerce(t, v, where, prefix + k)
  try:
    return cls(**kw)
  except TypeError as e:
    raise InputError(f"{where}: bad {prefix or cls.__name__} values ({e})") from None


def _coerce(t, v, where: str, name: str):
  """YAML reads `1e-4` as a string (YAML 1.1) and lists as lists: fix to the field's type."""
  args = [a for a in typing.get_args(t) if a is not type(None)]
  if v is None:
    return v
  if typing.get_origin(t) in (typing.Union, types.UnionType) and args:
    t = args[0]
  if isinstance(v, list):
    return tuple(v)
  try:
    if t is float and isinstance(v, (str, int)) and not isinstance(v, bool):
      return float(v)
    if t is int and isinstance(v, str):
      return int(v)
  except ValueError:
    raise InputError(f"{where}: {name}: cannot read {v!r} as {t.__name__}") from None
  return v
