"""Export formats of fine-tuned pipelines, one object each (FORMATS): a whole diffusers pipeline, the LoRA for
diffusers' loaders, the kohya / A1111 and ComfyUI LoRA layouts, and single-file Stable Diffusion checkpoints.
`export` writes one; each format's `load` is the reading library's loader (what its tests compare)."""

from __future__ import annotations

from pathlib import Path

from gen_dist.formats.base import Format, Tuned, load_tuned
from gen_dist.formats.kohya import ComfyLora, KohyaLora
from gen_dist.formats.ldm import SingleFile
from gen_dist.formats.lora import DiffusersLora
from gen_dist.formats.pipeline import DiffusersPipeline
from gen_dist.schema import ConfigError

__all__ = ["FORMATS", "Format", "Tuned", "export", "load_tuned"]

FORMATS: dict[str, Format] = {f.name: f for f in (DiffusersPipeline(), DiffusersLora(), KohyaLora(), ComfyLora(),
                                                   SingleFile())}


def export(path: Path, fmt: str, out: Path, use_ema: bool = True) -> Path:
    """Write the fine-tuned model of `path` (a run or checkpoint) as `fmt` at `out`."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: not a format; choose from gen-dist, {', '.join(FORMATS)}")
    tuned = load_tuned(path, use_ema)
    why = FORMATS[fmt].refusal(tuned)
    if why:
        raise ConfigError(why)
    return FORMATS[fmt].write(tuned, out)
