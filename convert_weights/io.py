"""Reading and writing PyTorch checkpoints as flat {key: numpy array} dicts.

- `.safetensors`: read lazily, one tensor at a time (`safe_open`), so peak memory is the
  result plus one tensor. bf16 becomes `ml_dtypes.bfloat16` numpy arrays (no precision lost).
- `.ckpt/.pt/.pth/.bin`: pickles, loaded ONLY with `torch.load(weights_only=True)`; a pickle
  that wants to run code is refused (pickled checkpoints are a known malware vector).
- diffusers folders: `unet/`, `vae/`, `text_encoder/` with their `config.json`.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Any, Optional

import ml_dtypes
import numpy as np

from convert_weights.errors import ConversionError

PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_EXTS = (".safetensors",)
# Weight files of one diffusers component, in order of preference.
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                      "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                      "diffusion_pytorch_model.bin", "pytorch_model.bin")


def _torch():
  import torch  # imported lazily: inspecting a safetensors header should not need it
  return torch


def tensor_to_numpy(t) -> np.ndarray:
  """A torch tensor as numpy, bit-exact (bf16 through an int16 view)."""
  torch = _torch()
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def numpy_to_tensor(a: np.ndarray):
  torch = _torch()
  a = np.ascontiguousarray(a)
  if a.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(a)


def _progress(it, total: int, desc: str, enabled: Optional[bool]):
  if enabled is None:
    enabled = total > 200 and os.isatty(2)
  if not enabled:
    return it
  from tqdm import tqdm
  return tqdm(it, total=total, desc=desc, unit="tensor", leave=False)


def _load_safetensors(path: str, progress: Optional[bool]) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  with safe_open(path, framework="pt") as f:
    keys = list(f.keys())
    for k in _progress(keys, len(keys), os.path.basename(path), progress):
      out[k] = tensor_to_numpy(f.get_tensor(k))
  return out


def _load_pickle(path: str):
  torch = _torch()
  try:
    try:  # mmap keeps the zip-format file out of RAM until each tensor is copied
      return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e) and "zip" not in str(e):
        raise
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(
        f"{path}: refused to load this pickle: it contains objects other than tensors (it may try "
        f"to run code), and only torch.load(weights_only=True) is allowed ({first[:160]})") from None
  except (RuntimeError, EOFError) as e:  # a truncated or corrupt zip archive / pickle stream
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): "
                          f"{first[:160]}") from None


def _flatten_pickle(obj: Any, path: str, info: dict) -> dict[str, np.ndarray]:
  torch = _torch()
  if not isinstance(obj, dict):
    raise ConversionError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
  if "animatediff_config" in obj:
    info["animatediff_config"] = obj["animatediff_config"]
  # Lightning / official training wrappers; the official SparseCtrl loader unwraps "controlnet".
  wrapper = next((w for w in ("state_dict", "controlnet") if isinstance(obj.get(w), dict)), None)
  if wrapper:
    dropped = [k for k in obj if k not in (wrapper, "animatediff_config")]
    if dropped:
      info["notes"].append(f"ignored wrapper entries: {', '.join(map(str, dropped[:8]))}")
    obj = obj[wrapper]
    if "animatediff_config" in obj:
      info["animatediff_config"] = obj["animatediff_config"]
  out, skipped = {}, []
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      out[str(k)] = tensor_to_numpy(v)
    elif k != "animatediff_config":
      skipped.append(str(k))
  if skipped:
    info["notes"].append(f"ignored non-tensor entries: {', '.join(skipped[:8])}")
  return out


def _strip_module_prefix(sd: dict, info: dict) -> dict:
  if sd and all(k.startswith("module.") for k in sd):  # DDP training output
    info["notes"].append("removed the 'module.' prefix (DDP)")
    return {k[len("module."):]: v for k, v in sd.items()}
  return sd


def load_torch_file(path: str, info: Optional[dict] = None,
                    progress: Optional[bool] = None) -> dict[str, np.ndarray]:
  """A checkpoint file as a flat {key: numpy array} (dtypes kept, bf16 as ml_dtypes.bfloat16).

  info, when given, is filled with `animatediff_config` (if the file has one), `notes`
  (what was unwrapped or ignored) and `format` ("safetensors" | "pickle").
  """
  info = info if info is not None else {}
  info.setdefault("notes", [])
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  ext = os.path.splitext(path)[1].lower()
  if ext in SAFETENSORS_EXTS:
    info["format"] = "safetensors"
    try:
      sd = _load_safetensors(path, progress)
    except ConversionError:
      raise
    except Exception as e:  # noqa: BLE001 - a corrupt header, unknown dtype...
      raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
  elif ext in PICKLE_EXTS:
    info["format"] = "pickle"
    sd = _flatten_pickle(_load_pickle(path), path, info)
  else:
    raise ConversionError(f"{path}: unknown file type {ext!r}; expected .safetensors, "
                          f"{', '.join(PICKLE_EXTS)} or a diffusers folder")
  if not sd:
    raise ConversionError(f"{path}: the file holds no tensors")
  return _strip_module_prefix(sd, info)


def save_torch_file(sd: dict[str, np.ndarray], path: str, metadata: Optional[dict] = None) -> None:
  """Write {key: array} as `.safetensors` or a torch pickle (`.ckpt/.pt/.pth/.bin`), by extension.

  Written to a temporary name and renamed, so a failure leaves no half-written file.
  """
  ext = os.path.splitext(path)[1].lower()
  tensors, seen = {}, set()
  for k, v in sd.items():
    t = numpy_to_tensor(v)
    if t.numel() and t.data_ptr() in seen:  # e.g. both pe buffers of a module: safetensors refuses
      t = t.clone()                        # tensors sharing memory, so store a copy
    seen.add(t.data_ptr())
    tensors[k] = t
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    if ext in SAFETENSORS_EXTS:
      from safetensors.torch import save_file
      save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    elif ext in PICKLE_EXTS:
      _torch().save(tensors, tmp)
    else:
      raise ConversionError(f"{path}: unknown output extension {ext!r}; use .safetensors or .ckpt")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def is_diffusers_folder(path: str) -> bool:
  return os.path.isdir(path) and any(
      os.path.isfile(os.path.join(path, c, "config.json")) for c in ("unet", "vae", "text_encoder"))


def component_weights(folder: str) -> Optional[str]:
  """The weights file of one diffusers component folder (e.g. `model/unet`), or None."""
  for name in _DIFFUSERS_WEIGHTS:
    p = os.path.join(folder, name)
    if os.path.isfile(p):
      return p
  return None


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def load_diffusers_component(folder: str, info: Optional[dict] = None,
                             progress: Optional[bool] = None) -> tuple[dict, dict]:
  """(state dict, config.json) of a diffusers component folder such as `model/unet`."""
  weights = component_weights(folder)
  if weights is None:
    raise ConversionError(f"{folder}: no weights file (looked for {', '.join(_DIFFUSERS_WEIGHTS)})")
  cfg_path = os.path.join(folder, "config.json")
  config = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
  return load_torch_file(weights, info, progress), config


def write_diffusers_component(folder: str, sd: dict[str, np.ndarray], config: dict,
                              weights_name: str = "diffusion_pytorch_model.safetensors",
                              metadata: Optional[dict] = None) -> None:
  """Weights + config.json into `folder` (made if missing): one diffusers component."""
  os.makedirs(folder, exist_ok=True)
  save_torch_file(sd, os.path.join(folder, weights_name), metadata=metadata)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def save_diffusers_component(out: str, sd: dict[str, np.ndarray], config: dict) -> None:
  """A new diffusers component folder at `out` (`from_pretrained` loads it), written under a
  temporary name and renamed at the end, so a crash leaves no half-written folder."""
  import shutil
  if os.path.exists(out):
    raise ConversionError(f"{out}: already exists")
  tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.tmp-{os.getpid()}")
  try:
    write_diffusers_component(tmp, sd, config)
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
