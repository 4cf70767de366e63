"""PixArt-alpha and PixArt-Sigma (PixArtAlphaPipeline, PixArtSigmaPipeline): a DiT with cross-attention to T5's
hidden states under their attention mask, on SD's VAE latents; its learned variance channels are not trained."""

from __future__ import annotations

import torch
from torch import nn

from gen_dist.pipelines.base import Cond, Encoded, Kind, Pipeline, PromptEncoders, Settings, ddpm_settings


class PixArtEncoders(PromptEncoders):
    def encode(self, prompts: list[str]) -> Encoded:
        out = self.run(0, prompts, self.lengths[0], mask=True)
        mask = self.ids(0, prompts, self.lengths[0])[1]
        h = out.last_hidden_state * mask[..., None]
        return [h], [mask], h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


class PixArt(Kind):
    name = "pixart"
    classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    denoiser = "transformer"
    components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")

    def settings(self, pipe: Pipeline, resolution: int) -> Settings:
        tokens = 300 if pipe.cls == "PixArtSigmaPipeline" else 120  # what each pipeline encodes by default
        return Settings({"backbone": "dit", **ddpm_settings(pipe)}, {"text_max_length": [tokens]})

    def text_shape(self, pipe: Pipeline, lengths: list[int]) -> tuple[int, int, int]:
        width = pipe.config("text_encoder")["d_model"]
        return lengths[0], width, width

    def encoders(self, pipe: Pipeline, lengths: list[int]) -> PromptEncoders:
        return PixArtEncoders(pipe, [("text_encoder", "tokenizer")], lengths)

    def call(self, pipe: Pipeline, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        sizes = None
        config = pipe.config("transformer")
        if config.get("use_additional_conditions", config.get("sample_size") == 128):
            h, w = x.shape[-2] * pipe.vae_factor, x.shape[-1] * pipe.vae_factor
            sizes = {"resolution": torch.tensor([[h, w]], dtype=x.dtype, device=x.device).expand(len(x), 2),
                     "aspect_ratio": torch.full((len(x), 1), h / w, dtype=x.dtype, device=x.device)}
        out = net(x, encoder_hidden_states=cond["text"].to(x.dtype), encoder_attention_mask=cond["text_mask"],
                  timestep=t, added_cond_kwargs=sizes or {"resolution": None, "aspect_ratio": None}).sample
        return out[:, : x.shape[1]]  # the predicted noise; the rest is the learned variance


KIND = PixArt()
