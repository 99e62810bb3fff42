"""Helpers for tests that use PyTorch (diffusers / transformers) as the independent reference."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from convert_weights.motion_module_keys import diffusers_to_official, is_pe_buffer
from convert_weights.tree import state_dict_to_tree


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
  """Replace every parameter with random values (diffusers zero-/one-initialises many of them,
  which would let wrong norms, biases or zero-init projections go unnoticed)."""
  g = torch.Generator().manual_seed(seed)
  for name, p in module.named_parameters():
    if p.ndim == 1:
      base = 1.0 if name.endswith("weight") else 0.0   # norm scales around 1, biases around 0
      p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    else:
      fan_in = math.prod(p.shape[1:])
      p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
  return module


def to_numpy_sd(module: nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def unet_params_from_diffusers(module: nn.Module) -> dict:
  """Our UNet3D params from a diffusers UNet2DConditionModel / UNetMotionModel state dict."""
  sd = {diffusers_to_official(k): v for k, v in to_numpy_sd(module).items() if not is_pe_buffer(k)}
  return state_dict_to_tree(sd)


class FrameGroupNorm(nn.Module):
  """Wraps a torch GroupNorm that sees (B*F, C, H, W) so it normalises per frame or across frames,
  with the official AnimateDiff semantics (used to patch the reference's known deviations)."""

  def __init__(self, gn: nn.GroupNorm, frames: int, across_frames: bool):
    super().__init__()
    self.gn, self.frames, self.across = gn, frames, across_frames

  def forward(self, x):
    if x.ndim == 5:  # diffusers' motion-module norm gets (B, C, F, H, W): make it per frame
      b, c, f, h, w = x.shape
      y = self.gn(x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w))
      return y.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
    if not self.across:
      return self.gn(x)
    bf, c, h, w = x.shape  # base-UNet norm on (B*F, C, H, W): pool statistics over frames (v1)
    b = bf // self.frames
    x5 = x.reshape(b, self.frames, c, h, w).permute(0, 2, 1, 3, 4)
    y = self.gn(x5)
    return y.permute(0, 2, 1, 3, 4).reshape(bf, c, h, w)


def patch_motion_norms_per_frame(unet: nn.Module, frames: int) -> None:
  """diffusers pools the motion-module GroupNorm over frames; the official code does not."""
  for name, mod in list(unet.named_modules()):
    if type(mod).__name__ == "AnimateDiffTransformer3D":
      mod.norm = FrameGroupNorm(mod.norm, frames, across_frames=False)


def patch_base_norms_across_frames(unet: nn.Module, frames: int) -> None:
  """v1 (`use_inflated_groupnorm: false`): ResNet norm1/norm2 and conv_norm_out pool over frames."""
  for name, mod in list(unet.named_modules()):
    if type(mod).__name__ == "ResnetBlock2D":
      mod.norm1 = FrameGroupNorm(mod.norm1, frames, True)
      mod.norm2 = FrameGroupNorm(mod.norm2, frames, True)
  unet.conv_norm_out = FrameGroupNorm(unet.conv_norm_out, frames, True)


def clip_params_from_transformers(model: nn.Module) -> dict:
  """Our CLIPTextModel params from a transformers CLIPTextModel (v5 drops the `text_model.` prefix)."""
  sd = {(k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in to_numpy_sd(model).items() if not k.endswith("position_ids")}
  return state_dict_to_tree(sd, embeddings=("token_embedding", "position_embedding"))


def vae_params_from_diffusers(model: nn.Module) -> dict:
  return state_dict_to_tree(to_numpy_sd(model))
