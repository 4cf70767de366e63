"""Fine-tuning a pretrained diffusers pipeline: the diffusion keys that name it and its LoRA, what the pipeline
decides of the rest of the config (filled in before any check, a contradiction refused naming both values), and
the pretrained denoiser with a peft LoRA adapter, of which only the adapter is trained and checkpointed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gen_dist.parallel import train_only
from gen_dist.pipelines import Pipeline, open_pipeline
from gen_dist.schema import ConfigError, RunConfig


@dataclass
class PretrainedKeys:
    """The diffusion section's fine-tuning keys."""

    pretrained: str = ""
    """A local diffusers pipeline directory (model_index.json: StableDiffusion[XL]Pipeline, PixArtAlpha/Sigma,
    StableDiffusion3Pipeline, FluxPipeline) to start from: its denoiser is trained, its VAE is the first stage, its
    text encoders condition, and it fixes the backbone, objective, prediction type, schedule, time shift and text
    lengths (a config value contradicting it is an error). Empty = train from scratch."""
    lora_rank: int = 0
    """With diffusion.pretrained: the rank of a LoRA adapter (peft) trained on the frozen denoiser; only the
    adapter is optimised, averaged and checkpointed. 0 = full fine-tuning."""
    lora_alpha: float = 0.0
    """LoRA alpha: the adapter's update is scaled by alpha / rank (kept in every export). 0 = the rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input."""
    lora_targets: list[str] = field(default_factory=list)
    """peft target modules: names or name suffixes of the layers that get an adapter (e.g. to_q, attn1.to_k,
    ff.net.2). Empty = the pipeline's attention projections."""


def _denoiser_config(pipe: Pipeline) -> dict[str, Any]:
    return pipe.config(pipe.kind.denoiser)


def architecture(pipe: Pipeline) -> dict[str, Any]:
    """The diffusion keys that describe the pipeline's denoiser, so that the config's own checks (resolution
    against the UNet's levels or the patch size) and the written config say what it is."""
    c = _denoiser_config(pipe)
    if pipe.kind.denoiser == "unet":
        return {"channels": list(c["block_out_channels"]), "norm_groups": c.get("norm_num_groups", 32),
                "attention": ["Attn" in b for b in c["down_block_types"]], "layers_per_block": c["layers_per_block"]}
    return {"patch_size": c.get("patch_size", 2), "dit_depth": c["num_layers"],
            "dit_heads": c["num_attention_heads"], "dit_head_dim": c["attention_head_dim"]}


def resolve(cfg: RunConfig) -> None:
    """Fill the config from diffusion.pretrained's pipeline: a key left at its default takes the pipeline's
    value; one set to another value is refused (the text lengths are only defaults)."""
    d = cfg.diffusion
    if cfg.task != "diffusion" or not d.pretrained:
        for key in ("lora_rank", "lora_alpha", "lora_dropout"):
            if getattr(d, key):
                raise ConfigError(f"diffusion.{key} needs diffusion.pretrained (LoRA adapts a pretrained denoiser)")
        return
    pipe = open_pipeline(d.pretrained)
    settings = pipe.kind.settings(pipe, cfg.data.resolution)
    fixed = {**settings.fixed, **architecture(pipe), "text_encoder": [str(pipe.path)],
             "first_stage": str(pipe.component("vae"))}
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(d)}
    for key, value in fixed.items():
        now = getattr(d, key)
        if now != value and now != defaults[key]:
            raise ConfigError(f"diffusion.{key}={now!r} contradicts diffusion.pretrained {d.pretrained} "
                              f"({pipe.cls}), whose value is {value!r}: leave diffusion.{key} unset")
        setattr(d, key, value)
    for key, value in settings.defaults.items():
        if getattr(d, key) == defaults[key]:
            setattr(d, key, value)
    parts = len(settings.defaults["text_max_length"])
    if len(d.text_max_length) != parts:
        raise ConfigError(f"diffusion.text_max_length={d.text_max_length}: a {pipe.cls} encodes {parts} token "
                          f"sequence(s) (default {settings.defaults['text_max_length']}); give {parts} lengths")
    channels = pipe.config("vae")["in_channels"]
    if cfg.data.channels not in (channels, 1):  # grey images are read as RGB
        raise ConfigError(f"data.channels={cfg.data.channels}: {d.pretrained}'s VAE takes {channels}-channel images")
    cfg.data.channels = channels


def check(cfg: RunConfig) -> None:
    """The LoRA settings against the pipeline's denoiser (read from its config, no weights loaded)."""
    d = cfg.diffusion
    if cfg.task != "diffusion" or not d.pretrained:
        return
    if d.lora_rank < 0 or d.lora_alpha < 0 or not 0 <= d.lora_dropout < 1:
        raise ConfigError(f"diffusion.lora_rank and lora_alpha must be >= 0 and lora_dropout in [0, 1), got "
                          f"{d.lora_rank}, {d.lora_alpha}, {d.lora_dropout}")
    if not d.lora_rank:
        if d.lora_targets or d.lora_alpha:
            raise ConfigError("diffusion.lora_targets and lora_alpha need diffusion.lora_rank > 0")
        return
    pipe = open_pipeline(d.pretrained)
    layers = adaptable_layers(pipe)
    targets = d.lora_targets or list(pipe.kind.lora_targets)
    unmatched = [t for t in targets if not any(matches(n, t) for n in layers)]
    if unmatched:
        some = sorted({_short(n) for n in layers})
        raise ConfigError(f"diffusion.lora_targets {unmatched} match no layer of {d.pretrained}'s "
                          f"{pipe.kind.denoiser}; layers it has end in e.g. {', '.join(some[:12])}")


def _short(name: str) -> str:
    """The end of a layer's name that a target names it by (attn1.to_q, conv1, to_out.0)."""
    parts = name.split(".")
    return ".".join(parts[-2:] if len(parts) > 1 and (parts[-1].isdigit() or not parts[-2].isdigit()) else parts[-1:])


def matches(name: str, target: str) -> bool:
    """peft's rule for a target given by name: the whole module name or its last dotted parts."""
    return name == target or name.endswith("." + target)


def _empty_denoiser(pipe: Pipeline) -> nn.Module:
    from accelerate import init_empty_weights

    cls = pipe.library_class(pipe.kind.denoiser)
    with init_empty_weights():
        return cls.from_config(_denoiser_config(pipe))


def adaptable_layers(pipe: Pipeline) -> list[str]:
    """Names of the denoiser's Linear and Conv2d layers (those a LoRA can adapt)."""
    return [n for n, m in _empty_denoiser(pipe).named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def pretrained_denoiser(cfg: RunConfig) -> nn.Module:
    """The pipeline's denoiser in fp32; with diffusion.lora_rank, frozen under a fresh LoRA adapter (its up
    projection zero, so training starts from the pretrained model's outputs) that alone is trained."""
    from peft import LoraConfig, inject_adapter_in_model

    d = cfg.diffusion
    pipe = open_pipeline(d.pretrained)
    net = pipe.library_class(pipe.kind.denoiser).from_pretrained(pipe.component(pipe.kind.denoiser)).float()
    if not d.lora_rank:
        return net
    net.requires_grad_(False)
    lora = LoraConfig(r=d.lora_rank, lora_alpha=d.lora_alpha or d.lora_rank, lora_dropout=d.lora_dropout,
                      target_modules=d.lora_targets or list(pipe.kind.lora_targets), init_lora_weights="gaussian")
    if hasattr(net, "add_adapter"):  # diffusers' own adapter support, which its LoRA loaders and savers read
        net.add_adapter(lora)
    else:  # PixArt's transformer has none: peft's injection gives the same layers
        inject_adapter_in_model(lora, net)
    train_only(net, {n for n, p in net.named_parameters() if p.requires_grad})
    return net
