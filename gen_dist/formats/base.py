"""A fine-tuned pipeline as the export formats see it, and the `Format` contract: a writer and the loader of the
library that reads the format back (tests compare what it loads with gen_dist's own denoiser)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from gen_dist.artifact import load_model
from gen_dist.parallel import is_partial, train_all
from gen_dist.pipelines import Pipeline, open_pipeline
from gen_dist.schema import ConfigError, RunConfig


@dataclass
class Tuned:
    """A run's fine-tuned denoiser (EMA or raw weights) with the pipeline it started from."""

    cfg: RunConfig
    pipe: Pipeline
    net: nn.Module
    """The denoiser as gen_dist trains it: the pretrained model, with its LoRA adapter where there is one."""

    @property
    def lora(self) -> bool:
        return is_partial(self.net)

    @property
    def rank(self) -> int:
        return self.cfg.diffusion.lora_rank

    @property
    def alpha(self) -> float:
        return self.cfg.diffusion.lora_alpha or float(self.cfg.diffusion.lora_rank)

    def adapter(self) -> dict[str, torch.Tensor]:
        """The LoRA weights keyed as peft names them (no adapter name), in fp32."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(self.net).items()}

    def lora_config(self) -> dict[str, Any]:
        """The adapter's peft config (rank, alpha, targets), as loaders that read adapter metadata take it."""
        from peft import LoraConfig

        d = self.cfg.diffusion
        config = LoraConfig(r=d.lora_rank, lora_alpha=self.alpha, lora_dropout=d.lora_dropout,
                            target_modules=list(d.lora_targets or self.pipe.kind.lora_targets),
                            init_lora_weights="gaussian")
        return config.to_dict()

    def merged(self) -> nn.Module:
        """A copy of the denoiser with the adapter merged into its weights: the pipeline's own class, as
        diffusers loads it."""
        net = copy.deepcopy(self.net)
        if not self.lora:
            return net
        train_all(net)
        for m in net.modules():
            if hasattr(m, "merge") and hasattr(m, "lora_A"):
                m.merge()
        weights = {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items() if ".lora_" not in k}
        plain = self.pipe.library_class(self.pipe.kind.denoiser).from_config(self.pipe.config(self.pipe.kind.denoiser))
        plain.load_state_dict(weights)
        return plain


def load_tuned(path: Path, use_ema: bool = True) -> Tuned:
    """The fine-tuned model of a run directory or checkpoint (EMA weights unless `use_ema` is false)."""
    cfg, _, net = load_model(path, use_ema, torch.device("cpu"))
    if cfg.task != "diffusion" or not cfg.diffusion.pretrained:
        raise ConfigError(f"{path} is not a fine-tuned pipeline (diffusion.pretrained is not set): export it with "
                          f"--format gen-dist")
    return Tuned(cfg, open_pipeline(cfg.diffusion.pretrained), net.float().eval())


class Format:
    """One export format: what it writes, for which pipelines and runs."""

    name: ClassVar[str]
    help: ClassVar[str]
    lora: ClassVar[bool | None] = None
    """True: only of a LoRA run; False: only of a full fine-tune; None: either."""

    def refusal(self, tuned: Tuned) -> str | None:
        """Why this format does not fit the run, or None."""
        kind = tuned.pipe.kind
        fits = kind.lora_formats if tuned.lora else kind.full_formats
        if self.name in fits or (self.lora is None and self.name in (*kind.lora_formats, *kind.full_formats)):
            return None
        what = "a LoRA" if tuned.lora else "a full fine-tune"
        return (f"--format {self.name} does not fit {what} of a {tuned.pipe.cls}; it exports as "
                f"{', '.join(fits)}")

    def write(self, tuned: Tuned, out: Path) -> Path:
        raise NotImplementedError

    def load(self, out: Path, base: Path) -> nn.Module:
        """The denoiser as the reading library loads `out` (onto the pipeline at `base` where the format holds
        only an adapter)."""
        raise NotImplementedError


def loaded_lora(file: Path, base: Path) -> nn.Module:
    """The denoiser of the pipeline at `base` with the LoRA file loaded by the pipeline's load_lora_weights."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    return getattr(pipe, "unet", None) or pipe.transformer


def safetensors_path(out: Path) -> Path:
    """A one-file format's output path, with the suffix its readers look for."""
    return out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")
