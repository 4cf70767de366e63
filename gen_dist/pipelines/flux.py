"""Flux (FluxPipeline): a rectified-flow transformer on 2x2-packed latents with rotary positions from image and
text ids, conditioned on T5's hidden states and CLIP's pooled output; guidance-distilled models (dev) take the
guidance scale as an input embedding."""

from __future__ import annotations

import math

import torch
from torch import nn

from gen_dist.pipelines.base import Cond, Encoded, Kind, Pipeline, PromptEncoders, Settings, all_tokens, unwrapped

EMBEDDED_GUIDANCE = 3.5
"""The guidance scale a guidance-distilled model is given, in training and sampling (diffusers' default)."""


class FluxEncoders(PromptEncoders):
    def encode(self, prompts: list[str]) -> Encoded:
        pooled = self.run(0, prompts, 77).pooler_output
        t5 = self.run(1, prompts, self.lengths[0]).last_hidden_state
        return [t5], [all_tokens(t5)], pooled


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents as (B, H/2 x W/2, 4C) tokens of 2x2 patches."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h // 2 * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Each packed token's (0, row, column): the positions of its rotary embedding."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def resolution_shift(scheduler: dict, tokens: int) -> float:
    """The time shift Flux's scheduler applies at this many image tokens (its dynamic shift, exp(mu))."""
    if not scheduler.get("use_dynamic_shifting"):
        return float(scheduler.get("shift", 1.0))
    lo, hi = scheduler.get("base_image_seq_len", 256), scheduler.get("max_image_seq_len", 4096)
    a, b = scheduler.get("base_shift", 0.5), scheduler.get("max_shift", 1.15)
    return math.exp(a + (b - a) * (tokens - lo) / (hi - lo))


class Flux(Kind):
    name = "flux"
    classes = ("FluxPipeline",)
    denoiser = "transformer"
    components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_formats = ("lora", "comfyui")

    def settings(self, pipe: Pipeline, resolution: int) -> Settings:
        tokens = (resolution // pipe.vae_factor // 2) ** 2
        shift = resolution_shift(pipe.config("scheduler"), tokens)
        return Settings({"backbone": "mmdit", "objective": "flow", "time_shift": shift}, {"text_max_length": [512]})

    def text_shape(self, pipe: Pipeline, lengths: list[int]) -> tuple[int, int, int]:
        return lengths[0], pipe.config("text_encoder_2")["d_model"], pipe.config("text_encoder")["hidden_size"]

    def encoders(self, pipe: Pipeline, lengths: list[int]) -> PromptEncoders:
        return FluxEncoders(pipe, [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")], lengths)

    def call(self, pipe: Pipeline, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        text = cond["text"].to(x.dtype)
        guided = unwrapped(net).config.guidance_embeds
        out = net(hidden_states=pack(x), encoder_hidden_states=text, pooled_projections=cond["text_pooled"].to(x.dtype),
                  timestep=t / 1000, img_ids=image_ids(x.shape[2], x.shape[3], x.device, x.dtype),
                  txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype),
                  guidance=torch.full_like(t, EMBEDDED_GUIDANCE, dtype=x.dtype) if guided else None).sample
        return unpack(out, x.shape)


KIND = Flux()
