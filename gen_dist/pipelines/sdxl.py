"""Stable Diffusion XL (StableDiffusionXLPipeline): a UNet conditioned on the penultimate hidden states of two CLIP
text encoders side by side, the second's projected pooled output and micro-conditioning on the original size,
crop and target size of each image."""

from __future__ import annotations

import torch
from torch import nn

from gen_dist.pipelines.base import (
    Cond,
    Encoded,
    Kind,
    Pipeline,
    PromptEncoders,
    Settings,
    all_tokens,
    ddpm_settings,
    tokenizer_length,
)


class SDXLEncoders(PromptEncoders):
    def encode(self, prompts: list[str]) -> Encoded:
        first, second = (self.run(i, prompts, self.lengths[0]) for i in range(2))
        h = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return [h], [all_tokens(h)], second.text_embeds


def time_ids(x: torch.Tensor, factor: int, geometry: torch.Tensor | None = None) -> torch.Tensor:
    """(original height, width, crop top, left, target height, width) of each image: from the stream's geometry
    of each sample where it has one (bucketed data), else the whole image at the training size, uncropped."""
    h, w = x.shape[-2] * factor, x.shape[-1] * factor
    if geometry is not None:
        target = torch.tensor([h, w], device=x.device).expand(x.shape[0], 2)
        return torch.cat([geometry.to(x.device), target], dim=1).to(x.dtype)
    return torch.tensor([h, w, 0, 0, h, w], dtype=x.dtype, device=x.device).expand(x.shape[0], 6)


class StableDiffusionXL(Kind):
    name = "sdxl"
    classes = ("StableDiffusionXLPipeline",)
    components = ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    lora_formats = ("lora", "kohya")
    full_formats = ("diffusers", "single-file")

    def settings(self, pipe: Pipeline, resolution: int) -> Settings:
        # An empty prompt is encoded as zeros where the pipeline says so (its classifier-free guidance does).
        null = "zero" if pipe.index.get("force_zeros_for_empty_prompt", True) else "empty"
        return Settings({"backbone": "unet", "null_caption": null, **ddpm_settings(pipe)},
                        {"text_max_length": [tokenizer_length(pipe)]})

    def text_shape(self, pipe: Pipeline, lengths: list[int]) -> tuple[int, int, int]:
        a, b = pipe.config("text_encoder"), pipe.config("text_encoder_2")
        return lengths[0], a["hidden_size"] + b["hidden_size"], b["projection_dim"]

    def encoders(self, pipe: Pipeline, lengths: list[int]) -> PromptEncoders:
        return SDXLEncoders(pipe, [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")], lengths)

    def call(self, pipe: Pipeline, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        added = {"text_embeds": cond["text_pooled"].to(x.dtype),
                 "time_ids": time_ids(x, pipe.vae_factor, cond.get("geometry"))}
        return net(x, t, encoder_hidden_states=cond["text"].to(x.dtype), added_cond_kwargs=added).sample


KIND = StableDiffusionXL()
