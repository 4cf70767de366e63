"""Stable Diffusion 3 (StableDiffusion3Pipeline): an MMDiT trained by flow matching, conditioned on two CLIP
encoders' penultimate states side by side (zero-padded to T5's width) followed by T5's states, and the two CLIP
projections' pooled outputs side by side."""

from __future__ import annotations

import torch
from torch import nn

from gen_dist.pipelines.base import Cond, Encoded, Kind, Pipeline, PromptEncoders, Settings, all_tokens


class SD3Encoders(PromptEncoders):
    def encode(self, prompts: list[str]) -> Encoded:
        first, second = (self.run(i, prompts, self.lengths[0]) for i in range(2))
        t5 = self.run(2, prompts, self.lengths[1]).last_hidden_state
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return [clip, t5], [all_tokens(clip), all_tokens(t5)], torch.cat([first.text_embeds, second.text_embeds], 1)


def flow_settings(pipe: Pipeline) -> dict:
    """A flow-matching pipeline's objective and time shift (its scheduler's static shift)."""
    return {"objective": "flow", "time_shift": float(pipe.config("scheduler").get("shift", 1.0))}


class StableDiffusion3(Kind):
    name = "sd3"
    classes = ("StableDiffusion3Pipeline",)
    denoiser = "transformer"
    components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                  "text_encoder_3", "tokenizer_3")
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora_formats = ("lora", "comfyui")

    def settings(self, pipe: Pipeline, resolution: int) -> Settings:
        # The pipeline's own sampling grid uses the same shift; logit-normal times as SD3 was trained.
        return Settings({"backbone": "mmdit", **flow_settings(pipe)}, {"text_max_length": [77, 256]})

    def text_shape(self, pipe: Pipeline, lengths: list[int]) -> tuple[int, int, int]:
        a, b, t5 = (pipe.config(c) for c in ("text_encoder", "text_encoder_2", "text_encoder_3"))
        return sum(lengths), max(a["hidden_size"] + b["hidden_size"], t5["d_model"]), a["projection_dim"] + b[
            "projection_dim"]

    def encoders(self, pipe: Pipeline, lengths: list[int]) -> PromptEncoders:
        pairs = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")]
        return SD3Encoders(pipe, pairs, lengths)

    def call(self, pipe: Pipeline, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return net(hidden_states=x, timestep=t, encoder_hidden_states=cond["text"].to(x.dtype),
                   pooled_projections=cond["text_pooled"].to(x.dtype)).sample


KIND = StableDiffusion3()
