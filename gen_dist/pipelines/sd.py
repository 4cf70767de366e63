"""Stable Diffusion 1.x and 2.x (StableDiffusionPipeline): a cross-attention UNet on the latents of a KL VAE,
conditioned on the last hidden states of one CLIP text encoder over all 77 tokens; epsilon or v-prediction on a
discrete noise schedule."""

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


class SDEncoders(PromptEncoders):
    def encode(self, prompts: list[str]) -> Encoded:
        out = self.run(0, prompts, self.lengths[0], mask=bool(getattr(self.nets[0].config, "use_attention_mask",
                                                                           False)))
        h = out.last_hidden_state
        return [h], [all_tokens(h)], out.pooler_output


class StableDiffusion(Kind):
    name = "sd"
    classes = ("StableDiffusionPipeline",)
    components = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
    lora_formats = ("lora", "kohya")
    full_formats = ("diffusers", "single-file")

    def settings(self, pipe: Pipeline, resolution: int) -> Settings:
        return Settings({"backbone": "unet", **ddpm_settings(pipe)}, {"text_max_length": [tokenizer_length(pipe)]})

    def text_shape(self, pipe: Pipeline, lengths: list[int]) -> tuple[int, int, int]:
        width = pipe.config("text_encoder")["hidden_size"]
        return lengths[0], width, width

    def encoders(self, pipe: Pipeline, lengths: list[int]) -> PromptEncoders:
        return SDEncoders(pipe, [("text_encoder", "tokenizer")], lengths)

    def call(self, pipe: Pipeline, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return net(x, t, encoder_hidden_states=cond["text"].to(x.dtype)).sample


KIND = StableDiffusion()
