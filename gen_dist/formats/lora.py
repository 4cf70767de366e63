"""`--format lora`: the adapter alone, as diffusers' LoRA loaders read it (`pytorch_lora_weights.safetensors` with
the adapter's peft config in its metadata, so alpha survives); for pipelines without a LoRA loader (PixArt), a
peft adapter directory (`PeftModel.from_pretrained(pipe.transformer, OUT)`)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from gen_dist.formats.base import Format, Tuned, loaded_lora

LORA_FILE = "pytorch_lora_weights.safetensors"


class DiffusersLora(Format):
    name = "lora"
    help = "the LoRA adapter: pytorch_lora_weights.safetensors for pipe.load_lora_weights (a peft adapter " \
           "directory where the pipeline has no LoRA loader)"
    lora = True

    def write(self, tuned: Tuned, out: Path) -> Path:
        cls = tuned.pipe.library_class_of_pipeline()
        out.mkdir(parents=True, exist_ok=True)
        if not hasattr(cls, "save_lora_weights"):
            return self._peft_directory(tuned, out)
        denoiser = tuned.pipe.kind.denoiser
        cls.save_lora_weights(out, **{f"{denoiser}_lora_layers": tuned.adapter(),
                                      f"{denoiser}_lora_adapter_metadata": tuned.lora_config()},
                              weight_name=LORA_FILE, safe_serialization=True)
        return out

    def _peft_directory(self, tuned: Tuned, out: Path) -> Path:
        from safetensors.torch import save_file

        # Keyed as a PeftModel around the denoiser names its weights.
        save_file({f"base_model.model.{k}": v for k, v in tuned.adapter().items()},
                  str(out / "adapter_model.safetensors"))
        config = {**tuned.lora_config(), "peft_type": "LORA"}
        config["target_modules"] = sorted(config["target_modules"])
        (out / "adapter_config.json").write_text(json.dumps(config, indent=1, default=list))
        return out

    def load(self, out: Path, base: Path) -> nn.Module:
        if (out / "adapter_config.json").is_file():
            from diffusers import DiffusionPipeline
            from peft import PeftModel

            return PeftModel.from_pretrained(DiffusionPipeline.from_pretrained(base).transformer, str(out)).eval()
        return loaded_lora(out / LORA_FILE, base)
