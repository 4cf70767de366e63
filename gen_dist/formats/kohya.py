"""LoRA adapters keyed as the Stable Diffusion UIs (A1111, ComfyUI) and kohya's scripts key them.

Both functions take a denoiser's adapter as `peft.get_peft_model_state_dict` returns it (`<module>.lora_A.weight`,
`<module>.lora_B.weight`) with the `lora_alpha` it was trained with; every module keeps the rank its tensors have.

UNets (SD 1.x, 2.x, XL), `to_kohya`: `lora_unet_<diffusers module path, dots as underscores>.lora_down.weight`,
`.lora_up.weight` and `.alpha`. The module paths stay diffusers-named (`down_blocks_1_attentions_0_...`), as kohya's
sd-scripts write SD 1.x LoRAs, rather than LDM-named (`input_blocks_4_1_...`), as they write SDXL ones, because that
is the one spelling all three readers take for both families:
- diffusers: `StableDiffusionPipeline.load_lora_weights` maps LDM block names without the UNet's config, so
  `input_blocks.N` lands on the wrong block; only the SDXL loader passes the config that
  `_maybe_map_sgm_blocks_to_diffusers` needs. Diffusers names convert in both.
- ComfyUI builds its key map for `lora_unet_*` from the model's own LDM names and from their diffusers names
  (`unet_to_diffusers` of the model's config), for every UNet family.
- A1111 converts diffusers names to LDM ones (`convert_diffusers_name_to_compvis`: down_blocks, mid_block,
  up_blocks, resnet suffixes) and, failing that, takes the name as LDM-named; its conversion counts three LDM blocks
  per level, as the released SD 1.x, 2.x and XL UNets have (two layers per level).

Transformers (SD 3, Flux), `to_comfyui`: see its docstring.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gen_dist.artifact import save_atomic
from gen_dist.formats.base import Format, Tuned, loaded_lora, safetensors_path

_PARTS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}


def _modules(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's (lora_A, lora_B) weights by module path."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        path, _, part = key.partition(".lora_")
        if "lora_" + part not in _PARTS:
            # DoRA magnitudes and LoRA biases have no place in these layouts: refuse rather than drop them
            raise ValueError(f"{key}: only lora_A / lora_B weights can be written in this layout")
        parts.setdefault(path, {})[_PARTS["lora_" + part]] = value
    incomplete = sorted(path for path, p in parts.items() if len(p) != 2)
    if incomplete:
        raise ValueError(f"modules without both lora_A and lora_B: {', '.join(incomplete)}")
    return {path: (p["lora_A"], p["lora_B"]) for path, p in parts.items()}


def to_kohya(adapter: dict[str, torch.Tensor], alpha: float, prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """A UNet adapter in the kohya / A1111 layout, with its real alpha on every module."""
    out: dict[str, torch.Tensor] = {}
    for path, (down, up) in _modules(adapter).items():
        name = f"{prefix}_{path.replace('.', '_')}"
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        # Readers scale by alpha / rank with the rank taken from lora_down, so alpha is stored as trained
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def to_comfyui(adapter: dict[str, torch.Tensor], alpha: float, kind: str) -> dict[str, torch.Tensor]:
    """An SD 3 or Flux transformer adapter that ComfyUI and diffusers both load: diffusers keys, alpha folded in.

    Keys are `transformer.<diffusers module path>.lora_A.weight` / `.lora_B.weight`, diffusers' own LoRA layout,
    with the scale alpha / rank multiplied into lora_B and no `.alpha` entry:
    - ComfyUI maps `transformer.<diffusers path>` to its fused SD 3 / Flux modules (q, k and v into qkv, with
      offsets) for both families, and reads `lora_A` / `lora_B` pairs; a missing alpha means scale 1.
    - diffusers loads that layout for both, and takes alpha = rank (scale 1) when the file has neither `.alpha`
      entries nor adapter metadata: the SD 3 loader rejects `.alpha` entries (every key must name a LoRA weight) and
      ComfyUI never reads the metadata, so a stored alpha could not reach both.
    The rejected layouts: `diffusion_model.*` is the prefix ComfyUI keeps for its own (SAI / BFL) module names, not
    diffusers ones; `lora_transformer_*` (kohya-style, diffusers names) reads in ComfyUI and in diffusers' Flux
    loader, but diffusers' SD 3 loader has no conversion for it.
    """
    if kind not in ("sd3", "flux"):
        raise ValueError(f"kind {kind!r}: one of 'sd3', 'flux'")
    out: dict[str, torch.Tensor] = {}
    for path, (down, up) in _modules(adapter).items():
        rank = down.shape[0]
        out[f"transformer.{path}.lora_A.weight"] = down
        out[f"transformer.{path}.lora_B.weight"] = up * (alpha / rank)
    return out


# ---------------------------------------------------------------------------------------------- formats


class KohyaLora(Format):
    name = "kohya"
    help = "an SD 1.x/2.x/SDXL LoRA as one .safetensors in the kohya layout A1111 and ComfyUI read, alpha kept"
    lora = True

    def write(self, tuned: Tuned, out: Path) -> Path:
        # kohya's metadata, which A1111 shows and kohya's own tools read back.
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(tuned.rank),
                "ss_network_alpha": str(tuned.alpha), "ss_base_model_version": tuned.pipe.kind.name}
        out = safetensors_path(out)
        save_atomic(out, to_kohya(tuned.adapter(), tuned.alpha), meta)
        return out

    def load(self, out: Path, base: Path) -> nn.Module:
        return loaded_lora(out, base)


class ComfyLora(Format):
    name = "comfyui"
    help = "an SD3/Flux LoRA as one .safetensors that ComfyUI and diffusers' loaders read"
    lora = True

    def write(self, tuned: Tuned, out: Path) -> Path:
        out = safetensors_path(out)
        save_atomic(out, to_comfyui(tuned.adapter(), tuned.alpha, tuned.pipe.kind.name), {})
        return out

    def load(self, out: Path, base: Path) -> nn.Module:
        return loaded_lora(out, base)
