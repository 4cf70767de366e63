"""`--format diffusers`: a whole pipeline directory, the pretrained one with the fine-tuned denoiser (an adapter
merged into it), which `DiffusionPipeline.from_pretrained` loads."""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from gen_dist.formats.base import Format, Tuned


class DiffusersPipeline(Format):
    name = "diffusers"
    help = "a diffusers pipeline directory (DiffusionPipeline.from_pretrained), an adapter merged in"

    def refusal(self, tuned: Tuned) -> str | None:
        return None  # every kind, full or LoRA

    def write(self, tuned: Tuned, out: Path) -> Path:
        denoiser = tuned.pipe.kind.denoiser
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        # Everything but the denoiser as it was (weights files are copied, not linked: the output stands alone).
        shutil.copytree(tuned.pipe.path, tmp, ignore=lambda d, names: names if Path(d).name == denoiser and
                        Path(d).parent == tuned.pipe.path else [])
        tuned.merged().save_pretrained(tmp / denoiser)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out

    def load(self, out: Path, base: Path) -> nn.Module:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(out)
        return getattr(pipe, "unet", None) or pipe.transformer
