"""Single-file Stable Diffusion checkpoints: a diffusers SD 1.x / 2.x / XL pipeline keyed as the original LDM (SD 1,
SD 2) and SGM (SDXL) code keys it, the layout that diffusers' `from_single_file`, A1111 and ComfyUI load.

- UNet under `model.diffusion_model.`: `input_blocks`, `middle_block` and `output_blocks` numbered from the UNet's
  config (levels, layers per level, which levels attend), so any UNet2DConditionModel of SD's block types maps.
- VAE under `first_stage_model.`.
- Text encoders: OpenAI CLIP (SD 1.x; SDXL's first) keyed as transformers' CLIPTextModel (`text_model.*`) under
  `cond_stage_model.transformer.` or `conditioner.embedders.0.transformer.`; OpenCLIP encoders (SD 2.x; SDXL's
  second) in open_clip's own layout (fused q/k/v `in_proj`, `resblocks`, `text_projection` as a matrix that the
  pooled output multiplies) under `cond_stage_model.model.` or `conditioner.embedders.<i>.model.`.
- Empty `v_pred` / `ztsnr` entries for v-prediction / zero-terminal-SNR schedulers, as community checkpoints mark them.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gen_dist.artifact import save_atomic
from gen_dist.formats.base import Format, Tuned, safetensors_path
from gen_dist.pipelines import Pipeline, open_pipeline

Tensors = dict[str, torch.Tensor]
Modules = dict[str, tuple[str, dict[str, str]]]
"""Diffusers module path -> (LDM module path, renames of the submodules inside it)."""

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_DOWN = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # the LDM UNet's blocks: with attention or without
_UP = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}


def single_file_state(pipe_dir: Path, unet: Tensors) -> Tensors:
    """The checkpoint of the SD / SDXL pipeline at `pipe_dir` with the UNet weights `unet`, in the LDM / SGM layout."""
    pipe = open_pipeline(pipe_dir, "single-file")
    index = pipe.index
    if pipe.kind.denoiser != "unet":
        raise ValueError(f"{pipe_dir}: not a Stable Diffusion (1.x, 2.x, XL) pipeline")
    state = _prefixed("model.diffusion_model.", _renamed(unet, _unet_modules(_unet_config(pipe_dir))))
    vae = _load(pipe, "vae")
    state |= _prefixed("first_stage_model.", _vae_state(vae.state_dict(), vae.config))
    if "text_encoder_2" in index:
        # SGM's conditioner numbers its embedders in order: XL base has CLIP-L (transformers layout) then OpenCLIP
        # bigG, the refiner bigG alone; the position, not the config, says which layout a UI expects
        present = [name for name in ("text_encoder", "text_encoder_2") if (index.get(name) or [None])[0]]
        for i, name in enumerate(present):
            layout = "model" if name == "text_encoder_2" else "transformer"
            state |= _prefixed(f"conditioner.embedders.{i}.{layout}.", _text_state(_load(pipe, name),
                                                                                   layout == "model"))
    else:
        model = _load(pipe, "text_encoder")
        layout = "model" if _is_open_clip(model) else "transformer"
        state |= _prefixed(f"cond_stage_model.{layout}.", _text_state(model, layout == "model"))
    return state | _markers(pipe)


def _prefixed(prefix: str, state: Tensors) -> Tensors:
    return {prefix + k: v for k, v in state.items()}


def _load(pipe: Pipeline, name: str) -> Any:
    """The pipeline's component `name`, with the class its model_index.json names."""
    return pipe.library_class(name).from_pretrained(pipe.component(name))


def _unet_config(pipe_dir: Path) -> dict[str, Any]:
    """The UNet's config, with the class defaults for what its config.json leaves out."""
    from diffusers import UNet2DConditionModel

    defaults = {name: p.default for name, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()}
    return {**defaults, **UNet2DConditionModel.load_config(pipe_dir / "unet")}


def _unet_modules(config: dict[str, Any]) -> Modules:
    """Where each module of the UNet of `config` sits in LDM's UNetModel."""
    down, up = config["down_block_types"], config["up_block_types"]
    for kind in (*down, *up, config["mid_block_type"]):
        if kind not in (*_DOWN, *_UP, "UNetMidBlock2DCrossAttn"):
            raise ValueError(f"UNet block {kind}: the LDM UNet has no such block")
    levels = len(down)
    layers = config["layers_per_block"]
    layers = [layers] * levels if isinstance(layers, int) else list(layers)
    # Only the number of transformer blocks inside an attention depends on transformer_layers_per_block, and LDM's
    # SpatialTransformer names those as diffusers' Transformer2DModel does, so attentions map as a whole
    modules: Modules = {
        "conv_in": ("input_blocks.0.0", {}),
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        # SDXL's size / crop conditioning and class-conditioned UNets share LDM's label_emb
        "add_embedding.linear_1": ("label_emb.0.0", {}),
        "add_embedding.linear_2": ("label_emb.0.2", {}),
        "class_embedding.linear_1": ("label_emb.0.0", {}),
        "class_embedding.linear_2": ("label_emb.0.2", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        # LDM's middle block is always resnet, attention, resnet
        "mid_block.resnets.0": ("middle_block.0", _RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", _RESNET),
    }
    # input_blocks: conv_in, then per level one block per layer (resnet, attention) and a downsampler between levels
    block = 1
    for level, kind in enumerate(down):
        for i in range(layers[level]):
            modules[f"down_blocks.{level}.resnets.{i}"] = (f"input_blocks.{block}.0", _RESNET)
            if _DOWN[kind]:
                modules[f"down_blocks.{level}.attentions.{i}"] = (f"input_blocks.{block}.1", {})
            block += 1
        if level < levels - 1:
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{block}.0.op", {})
            block += 1
    # output_blocks: deepest level first, one block per layer plus one (the skip from the level's downsampler), the
    # level's upsampler riding in its last block after the resnet and attention
    block = 0
    for level, kind in enumerate(up):
        count = layers[levels - 1 - level] + 1
        for i in range(count):
            modules[f"up_blocks.{level}.resnets.{i}"] = (f"output_blocks.{block}.0", _RESNET)
            if _UP[kind]:
                modules[f"up_blocks.{level}.attentions.{i}"] = (f"output_blocks.{block}.1", {})
            if i == count - 1 and level < levels - 1:
                modules[f"up_blocks.{level}.upsamplers.0.conv"] = (f"output_blocks.{block}.{1 + _UP[kind]}.conv", {})
            block += 1
    return modules


def _vae_modules(config: Any) -> Modules:
    """Where each module of the AutoencoderKL of `config` sits in LDM's AutoencoderKL."""
    levels, layers = len(config.down_block_types), config.layers_per_block
    modules: Modules = {name: (name, {}) for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        modules |= {f"{part}.conv_in": (f"{part}.conv_in", {}), f"{part}.conv_out": (f"{part}.conv_out", {}),
                    f"{part}.conv_norm_out": (f"{part}.norm_out", {}),
                    f"{part}.mid_block.resnets.0": (f"{part}.mid.block_1", _VAE_RESNET),
                    f"{part}.mid_block.attentions.0": (f"{part}.mid.attn_1", _VAE_ATTENTION),
                    f"{part}.mid_block.resnets.1": (f"{part}.mid.block_2", _VAE_RESNET)}
    for level in range(levels):
        for i in range(layers):
            modules[f"encoder.down_blocks.{level}.resnets.{i}"] = (f"encoder.down.{level}.block.{i}", _VAE_RESNET)
        modules[f"encoder.down_blocks.{level}.downsamplers.0"] = (f"encoder.down.{level}.downsample", {})
        # diffusers' decoder runs deepest level first; LDM indexes decoder.up by resolution, as encoder.down
        up = levels - 1 - level
        for i in range(layers + 1):
            modules[f"decoder.up_blocks.{level}.resnets.{i}"] = (f"decoder.up.{up}.block.{i}", _VAE_RESNET)
        modules[f"decoder.up_blocks.{level}.upsamplers.0"] = (f"decoder.up.{up}.upsample", {})
    return modules


def _renamed(state: Tensors, modules: Modules) -> Tensors:
    """`state` with each key's longest module path in `modules` replaced by its LDM path."""
    out: Tensors = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            path = ".".join(parts[:cut])
            if path in modules:
                target, inner = modules[path]
                sub = ".".join(parts[cut:-1])
                out[".".join(p for p in (target, inner.get(sub, sub), parts[-1]) if p)] = value
                break
        else:
            # A module the LDM model lacks would load nowhere: refuse rather than write a checkpoint missing it
            raise ValueError(f"{key}: no place for it in the original layout")
    return out


def _vae_state(state: Tensors, config: Any) -> Tensors:
    """A diffusers AutoencoderKL's weights keyed as LDM's AutoencoderKL."""
    out = _renamed(state, _vae_modules(config))
    for key, value in out.items():
        # LDM's VAE attention projects with 1x1 convolutions where diffusers has linear layers
        if ".mid.attn_1." in key and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def _is_open_clip(model: Any) -> bool:
    """Whether a transformers CLIP text model is an OpenCLIP one (SD 2.x): their text towers use exact GELU, OpenAI's
    CLIP (SD 1.x) quick GELU, and diffusers' SD configs record which."""
    return model.config.hidden_act == "gelu"


def _text_state(model: Any, open_clip: bool) -> Tensors:
    """A transformers CLIP text encoder's weights, in open_clip's layout if `open_clip`."""
    # transformers 5.6 flattened CLIPTextModel (no `text_model.` level); single files keep the older names
    state = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
             for k, v in model.state_dict().items()}
    return _open_clip_state(state, model.config.num_hidden_layers) if open_clip else state


def _open_clip_state(state: Tensors, layers: int) -> Tensors:
    """transformers CLIP text weights (`text_model.*`, `text_projection.weight`) keyed as open_clip's text tower."""
    state = dict(state)
    take = state.pop
    out = {
        "token_embedding.weight": take("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": take("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": take("text_model.final_layer_norm.weight"),
        "ln_final.bias": take("text_model.final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        # open_clip multiplies the pooled output by the matrix (x @ P); a Linear layer stores P transposed
        out["text_projection"] = take("text_projection.weight").T.contiguous()
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            # torch's MultiheadAttention keeps q, k and v as one stacked projection
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([take(f"{src}self_attn.{x}_proj.{p}") for x in "qkv"])
            for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{new}.{p}"] = take(f"{src}{old}.{p}")
    if state:
        raise ValueError(f"text encoder weights with no open_clip name: {', '.join(sorted(state))}")
    return out


def _markers(pipe: Pipeline) -> Tensors:
    """The empty `v_pred` / `ztsnr` entries by which single files tell UIs (ComfyUI reads them for SDXL) that the
    model predicts v or was trained with zero terminal SNR: nothing else in the file says so."""
    config = pipe.config("scheduler")
    markers: Tensors = {}
    if config.get("prediction_type") == "v_prediction":
        markers["v_pred"] = torch.tensor([])
    if config.get("rescale_betas_zero_snr"):
        markers["ztsnr"] = torch.tensor([])
    return markers


class SingleFile(Format):
    name = "single-file"
    help = "an SD 1.x/2.x/SDXL checkpoint as one .safetensors (from_single_file, A1111, ComfyUI), adapter merged"

    def write(self, tuned: Tuned, out: Path) -> Path:
        unet = {k: v.detach().float().cpu().contiguous() for k, v in tuned.merged().state_dict().items()}
        out = safetensors_path(out)
        save_atomic(out, single_file_state(tuned.pipe.path, unet), {"format": "pt"})
        return out

    def load(self, out: Path, base: Path) -> nn.Module:
        cls = open_pipeline(base).library_class_of_pipeline()
        return cls.from_single_file(str(out), config=str(base)).unet
