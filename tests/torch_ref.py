"""Helpers for tests that use PyTorch (diffusers / transformers) as the independent reference."""
from __future__ import annotations

import math
import os

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


def tiny_unet2d():
  """diffusers UNet2DConditionModel of ModelConfig.tiny()'s image UNet (its own init: randomize it)."""
  from diffusers import UNet2DConditionModel
  return UNet2DConditionModel(
      block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=2, cross_attention_dim=32,
      norm_num_groups=8, sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_text_encoder(seed: int):
  """transformers CLIPTextModel of ModelConfig.tiny()'s text encoder, random (`randomize_`)."""
  from transformers import CLIPTextConfig, CLIPTextModel
  from adiff_jax.model import ModelConfig
  t = ModelConfig.tiny().text
  return randomize_(CLIPTextModel(CLIPTextConfig(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
      max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act)), seed).eval()


def tiny_vae(seed: int, **kw):
  """diffusers AutoencoderKL of ModelConfig.tiny()'s VAE, random (`randomize_`); kw: e.g.
  scaling_factor (SDXL's 0.13025)."""
  from diffusers import AutoencoderKL
  return randomize_(AutoencoderKL(block_out_channels=(32, 64, 64), layers_per_block=1,
                                  norm_num_groups=8, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, **kw), seed).eval()


def tiny_unet_motion(seed: int = 1):
  """(diffusers UNetMotionModel, MotionAdapter) of ModelConfig.tiny()'s UNet and motion module,
  every parameter random (`randomize_(..., seed)`), in eval mode."""
  from diffusers import MotionAdapter, UNetMotionModel
  unet2d = tiny_unet2d()
  adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2,
                          motion_num_attention_heads=2, motion_norm_num_groups=8,
                          motion_max_seq_length=32, use_motion_mid_block=False)
  return randomize_(UNetMotionModel.from_unet2d(unet2d, adapter), seed).eval(), adapter


def tiny_animatediff(tok_dir):
  """(ModelConfig.tiny(), our params, diffusers AnimateDiffPipeline) with the same random tiny
  weights: the reference for whole-pipeline parity (motion norms patched per frame, as the
  official code; DDIM with the official AnimateDiff settings)."""
  import torch
  from diffusers import AnimateDiffPipeline, DDIMScheduler
  from transformers import CLIPTokenizer as HFTokenizer
  from adiff_jax.model import ModelConfig
  from adiff_jax.tokenizer import CLIPTokenizer

  torch.manual_seed(0)
  cfg = ModelConfig.tiny()
  unet, adapter = tiny_unet_motion(1)
  text, vae = tiny_text_encoder(2), tiny_vae(3)
  params = {"unet": unet_params_from_diffusers(unet), "text_encoder": clip_params_from_transformers(text),
            "vae": vae_params_from_diffusers(vae)}
  patch_motion_norms_per_frame(unet, 8)
  CLIPTokenizer.default().save_pretrained(tok_dir)
  hf_tok = HFTokenizer.from_pretrained(tok_dir, pad_token="<|endoftext|>", model_max_length=77)
  sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="linear", steps_offset=1, clip_sample=False,
                        set_alpha_to_one=True, timestep_spacing="leading")
  pipe = AnimateDiffPipeline(vae=vae, text_encoder=text, tokenizer=hf_tok, unet=unet,
                             motion_adapter=adapter, scheduler=sched)
  return cfg, params, pipe


def tiny_controlnet(seed: int = 0, **kw):
  """diffusers ControlNetModel of ModelConfig.tiny()'s image UNet (the layers it copies), with a
  cheap conditioning embedding (8, 16, 16, 16: the published three stride-2 steps, images at 8x
  the latents), every parameter random (`randomize_(..., seed)`), in eval mode. kw: other
  ControlNetModel settings (global_pool_conditions, controlnet_conditioning_channel_order...)."""
  from diffusers import ControlNetModel
  torch.manual_seed(seed)
  base = dict(in_channels=4, conditioning_channels=3, block_out_channels=(32, 64),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=2,
              attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8,
              conditioning_embedding_out_channels=(8, 16, 16, 16))
  return randomize_(ControlNetModel(**{**base, **kw}), seed).eval()


def tiny_unet2d_sdxl():
  """diffusers UNet2DConditionModel of ModelConfig.tiny_sdxl()'s image UNet (its own init)."""
  from diffusers import UNet2DConditionModel
  from adiff_jax.model import ModelConfig
  u = ModelConfig.tiny_sdxl().unet
  return UNet2DConditionModel(
      block_out_channels=u.block_out_channels, layers_per_block=2, attention_head_dim=u.attention_heads,
      transformer_layers_per_block=u.transformer_depth, cross_attention_dim=u.cross_attention_dim,
      norm_num_groups=u.norm_num_groups, sample_size=8, use_linear_projection=True,
      addition_embed_type="text_time", addition_time_embed_dim=u.addition_time_embed_dim,
      projection_class_embeddings_input_dim=u.projection_class_embeddings_input_dim,
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def tiny_animatediff_sdxl(tok_dir):
  """(ModelConfig.tiny_sdxl(), our params, diffusers AnimateDiffSDXLPipeline) with the same random
  tiny weights: both text encoders (the second with projection), the SDXL-layout UNet with its
  motion adapter (motion GroupNorm pooled over frames in both: the official SDXL code's), SDXL VAE
  scaling, the official sdxl-branch Euler settings."""
  import torch
  from diffusers import AnimateDiffSDXLPipeline, EulerDiscreteScheduler, MotionAdapter, UNetMotionModel
  from transformers import CLIPTokenizer as HFTokenizer
  from transformers import CLIPTextConfig as HFConfig, CLIPTextModel, CLIPTextModelWithProjection
  from adiff_jax.model import ModelConfig
  from adiff_jax.tokenizer import CLIPTokenizer
  from convert_weights.sd_base import tree_from_diffusers

  torch.manual_seed(0)
  cfg = ModelConfig.tiny_sdxl()
  u = cfg.unet
  unet2d = tiny_unet2d_sdxl()
  adapter = MotionAdapter(block_out_channels=u.block_out_channels, motion_layers_per_block=2,
                          motion_num_attention_heads=cfg.motion.num_heads,
                          motion_norm_num_groups=cfg.motion.norm_groups, motion_max_seq_length=32,
                          use_motion_mid_block=False)
  unet = randomize_(UNetMotionModel.from_unet2d(unet2d, adapter), 1).eval()

  def text_model(t, cls, seed):
    kw = dict(projection_dim=t.projection_dim) if t.projection_dim else {}
    return randomize_(cls(HFConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act,
        bos_token_id=0, eos_token_id=2, pad_token_id=1, **kw)), seed).eval()
  text = text_model(cfg.text, CLIPTextModel, 2)
  text_2 = text_model(cfg.text_2, CLIPTextModelWithProjection, 4)
  vae = tiny_vae(3, scaling_factor=cfg.vae.scaling_factor)
  params = {"unet": unet_params_from_diffusers(unet),
            "text_encoder": tree_from_diffusers(text.state_dict(), "text_encoder"),
            "text_encoder_2": tree_from_diffusers(text_2.state_dict(), "text_encoder"),
            "vae": vae_params_from_diffusers(vae)}
  CLIPTokenizer.default().save_pretrained(os.path.join(tok_dir, "tokenizer"))
  CLIPTokenizer.default(pad="!").save_pretrained(os.path.join(tok_dir, "tokenizer_2"))
  tok = HFTokenizer.from_pretrained(os.path.join(tok_dir, "tokenizer"))
  tok_2 = HFTokenizer.from_pretrained(os.path.join(tok_dir, "tokenizer_2"))
  sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.020,
                                 beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
  pipe = AnimateDiffSDXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                 tokenizer_2=tok_2, unet=unet, motion_adapter=adapter, scheduler=sched,
                                 force_zeros_for_empty_prompt=True)
  return cfg, params, pipe
