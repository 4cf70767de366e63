"""What every pipeline kind shares: reading a diffusers pipeline directory (model_index.json and its components),
the frozen prompt encoders with the pipeline's tokenizers, and the `Kind` contract a pipeline class answers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from gen_dist.artifact import weights_digest
from gen_dist.dist import whole_pretrained_loads
from gen_dist.schema import ConfigError

MODEL_INDEX = "model_index.json"
Cond = dict[str, torch.Tensor]
"""A text condition: 'text' (B, tokens, width), 'text_mask' (B, tokens), 'text_pooled' (B, pooled)."""
Encoded = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]
"""What an encoder stack makes of prompts: each part's hidden states and mask, and the pooled vectors."""


@dataclass(frozen=True)
class Pipeline:
    """A diffusers pipeline directory and the kind that reads it."""

    path: Path
    index: dict[str, Any]
    kind: Kind

    @property
    def cls(self) -> str:
        return self.index["_class_name"]

    def component(self, name: str) -> Path:
        return self.path / name

    def config(self, name: str) -> dict[str, Any]:
        """The saved config of component `name` (a model's config.json, a scheduler's scheduler_config.json)."""
        for file in ("config.json", "scheduler_config.json"):
            if (self.path / name / file).is_file():
                return json.loads((self.path / name / file).read_text())
        raise ConfigError(f"diffusion.pretrained: {self.path / name} has no config.json")

    def library_class(self, name: str) -> Any:
        """The class model_index.json names for component `name` (e.g. transformers' CLIPTextModel)."""
        import importlib

        library, cls = self.index[name]
        return getattr(importlib.import_module(library), cls)

    def library_class_of_pipeline(self) -> Any:
        """diffusers' class of the whole pipeline."""
        import diffusers

        return getattr(diffusers, self.cls)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent along a side."""
        return 2 ** (len(self.config("vae")["block_out_channels"]) - 1)

    def call(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's prediction at (x, t), t one value per image or one for all."""
        return self.kind.call(self, net, x, t.expand(x.shape[0]), cond)


@dataclass(frozen=True)
class Settings:
    """What a pipeline decides of the diffusion config: `fixed` keys must not be set otherwise; `defaults` are
    taken unless the config sets them."""

    fixed: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)


class Kind:
    """One family of diffusers pipeline classes: what its directory holds, what it fixes of the config, how its
    prompts are encoded and how its denoiser is called. Subclasses are registered once (`gen_dist.pipelines`)."""

    name: ClassVar[str]
    classes: ClassVar[tuple[str, ...]]
    """The model_index.json `_class_name`s it reads."""
    denoiser: ClassVar[str] = "unet"
    """The component trained: unet or transformer."""
    components: ClassVar[tuple[str, ...]]
    """Components that must be present (the denoiser, vae, scheduler, encoders and tokenizers)."""
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    """peft target modules of a LoRA by default: the attention projections, as diffusers' scripts choose."""
    lora_formats: ClassVar[tuple[str, ...]] = ("lora",)
    """Export formats a LoRA of this kind can be written in."""
    full_formats: ClassVar[tuple[str, ...]] = ("diffusers",)
    """Export formats a full fine-tune of this kind can be written in."""

    def settings(self, pipe: Pipeline, resolution: int) -> Settings:
        raise NotImplementedError

    def text_shape(self, pipe: Pipeline, lengths: list[int]) -> tuple[int, int, int]:
        """(tokens, width, pooled width) of the condition its encoders make."""
        raise NotImplementedError

    def encoders(self, pipe: Pipeline, lengths: list[int]) -> PromptEncoders:
        raise NotImplementedError

    def call(self, pipe: Pipeline, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's prediction at latents `x`, timesteps `t` (gen_dist's scale: 0..1000), condition
        `cond`, in the objective's terms (learned variances cut off)."""
        raise NotImplementedError


def unwrapped(net: nn.Module) -> nn.Module:
    """The model inside DDP's and DeepSpeed's wrappers."""
    while isinstance(getattr(net, "module", None), nn.Module):
        net = net.module
    return net


def tokenizer_length(pipe: Pipeline, name: str = "tokenizer", most: int = 77) -> int:
    """The length a pipeline pads its prompts to (its tokenizer's model_max_length), at most `most`."""
    found = pipe.path / name / "tokenizer_config.json"
    length = json.loads(found.read_text()).get("model_max_length", most) if found.is_file() else most
    return int(min(length, most))


def ddpm_settings(pipe: Pipeline) -> dict[str, Any]:
    """A discrete-time pipeline's schedule: objective ddpm, its prediction type, betas and timesteps."""
    s = pipe.config("scheduler")
    return {"objective": "ddpm", "prediction": s.get("prediction_type", "epsilon"),
            "beta_schedule": s.get("beta_schedule", "linear"), "train_timesteps": s.get("num_train_timesteps", 1000)}


# ---------------------------------------------------------------------------------------------- encoders


class PromptEncoders(nn.Module):
    """A pipeline's frozen text encoders and tokenizers (pairs of components such as text_encoder / tokenizer),
    run in fp32 outside autocast; `encode` is the kind's way of turning their outputs into a condition."""

    def __init__(self, pipe: Pipeline, pairs: list[tuple[str, str]], lengths: list[int]) -> None:
        super().__init__()
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        whole_pretrained_loads()
        self.pipe, self.lengths = pipe, lengths
        self.sources = [str(pipe.path)]
        self.nets = nn.ModuleList(pipe.library_class(e).from_pretrained(pipe.component(e)).eval().requires_grad_(False)
                                  for e, _ in pairs)
        self.tokenizers = [pipe.library_class(t).from_pretrained(pipe.component(t)) for _, t in pairs]
        self._record = [{"source": f"{pipe.path}/{e}", "digest": weights_digest(n.state_dict())[:16]}
                        for (e, _), n in zip(pairs, self.nets, strict=True)]
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            self.nets.to(torch.bfloat16)

    def record(self) -> list[dict[str, str]]:
        """Each encoder's source and weights checksum."""
        return self._record

    def ids(self, i: int, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of encoder i's tokenizer, padded to `length`."""
        device = next(self.parameters()).device
        tokens = self.tokenizers[i](prompts, padding="max_length", max_length=length, truncation=True,
                                    return_tensors="pt")
        return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)

    def run(self, i: int, prompts: list[str], length: int, mask: bool = False) -> Any:
        """Encoder i's outputs (all hidden states kept); the tokenizer's mask is passed only where the pipeline
        passes it."""
        ids, attention = self.ids(i, prompts, length)
        return self.nets[i](input_ids=ids, attention_mask=attention if mask else None, output_hidden_states=True)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Encoded:
        device = next(self.parameters()).device
        with torch.autocast(device.type, enabled=False):
            hidden, masks, pooled = self.encode(prompts)
        return [h.float() for h in hidden], masks, pooled.float()

    def encode(self, prompts: list[str]) -> Encoded:
        raise NotImplementedError


def all_tokens(h: torch.Tensor) -> torch.Tensor:
    """A mask of every token: the pipelines that pass no attention mask attend to the padding too."""
    return torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
