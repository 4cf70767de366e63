"""The denoising networks of diffusion, built from diffusers' classes: a UNet and a DiT, conditioned on a class or
unconditional; with text, a cross-attention UNet, a cross-attention DiT (PixArt) and a joint-attention MMDiT (SD3).
`call` runs any of them on (x, t, condition)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from gen_dist.schema import RunConfig

if TYPE_CHECKING:
    from diffusers import UNet2DModel


def build_unet(cfg: RunConfig, channels: int, size: int, text: tuple[int, int, int] | None = None) -> UNet2DModel:
    from diffusers import UNet2DModel

    d = cfg.diffusion
    if text is not None:
        return build_text_unet(cfg, channels, size, text)
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in d.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(d.attention))
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(d.channels), down_block_types=down, up_block_types=up,
        layers_per_block=d.layers_per_block, norm_num_groups=d.norm_groups,
        # The extra embedding is the null class of classifier-free guidance.
        num_class_embeds=(d.num_classes + (d.label_dropout > 0)) if d.num_classes else None,
        attention_head_dim=d.head_dim,
    )


def build_text_unet(cfg: RunConfig, channels: int, size: int, text: tuple[int, int, int]) -> nn.Module:
    """UNet2DConditionModel: cross-attention to the caption's tokens at the attention levels and the middle, and
    the pooled vector added to the timestep embedding (as SDXL adds its pooled text)."""
    from diffusers import UNet2DConditionModel

    d = cfg.diffusion
    _, width, pooled = text
    return UNet2DConditionModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=tuple(d.channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in d.attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(d.attention)),
        layers_per_block=d.layers_per_block, norm_num_groups=d.norm_groups, cross_attention_dim=width,
        attention_head_dim=tuple(max(1, c // d.head_dim) for c in d.channels),  # diffusers' name for the head count
        class_embed_type="projection", projection_class_embeddings_input_dim=pooled)


def build_pixart(cfg: RunConfig, channels: int, size: int, text: tuple[int, int, int]) -> nn.Module:
    """PixArt-alpha's DiT: cross-attention to the caption (projected to the width), one shared adaLN-single
    timestep modulation; its output layer starts at zero."""
    from diffusers import PixArtTransformer2DModel

    d = cfg.diffusion
    inner = d.dit_heads * d.dit_head_dim
    net = PixArtTransformer2DModel(
        num_attention_heads=d.dit_heads, attention_head_dim=d.dit_head_dim, in_channels=channels,
        out_channels=channels, num_layers=d.dit_depth, cross_attention_dim=inner, sample_size=size,
        patch_size=d.patch_size, use_additional_conditions=False, caption_channels=text[1])
    nn.init.zeros_(net.proj_out.weight)
    nn.init.zeros_(net.proj_out.bias)
    net._no_split_modules = ["BasicTransformerBlock"]
    return net


def build_mmdit(cfg: RunConfig, channels: int, size: int, text: tuple[int, int, int]) -> nn.Module:
    """SD3's MMDiT: image and caption tokens in one joint attention, each stream with its own weights; the pooled
    vector joins the timestep embedding; its output layer starts at zero."""
    from diffusers import SD3Transformer2DModel

    from gen_dist.tasks.sizes import image_sizes

    d = cfg.diffusion
    inner = d.dit_heads * d.dit_head_dim
    net = SD3Transformer2DModel(
        sample_size=size, patch_size=d.patch_size, in_channels=channels, out_channels=channels,
        num_layers=d.dit_depth, attention_head_dim=d.dit_head_dim, num_attention_heads=d.dit_heads,
        joint_attention_dim=text[1], caption_projection_dim=inner, pooled_projection_dim=text[2],
        pos_embed_max_size=size * max(max(hw) for hw in image_sizes(cfg)) // cfg.data.resolution // d.patch_size)
    nn.init.zeros_(net.proj_out.weight)
    nn.init.zeros_(net.proj_out.bias)
    net._no_split_modules = ["JointTransformerBlock"]
    return net


def build_dit(cfg: RunConfig, channels: int, size: int, text: tuple[int, int, int] | None = None) -> nn.Module:
    """diffusers' DiT with adaLN-Zero's zero initialisation (every block starts as the identity, the output at
    zero; Peebles & Xie 2023). Its label embeddings keep their null class (index num_classes) but do not drop
    labels themselves: each block has its own embedding, and a drop must be the same in all of them, so the
    task drops labels once (diffusion.label_dropout) before the call."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

    if text is not None:
        return build_pixart(cfg, channels, size, text)
    d = cfg.diffusion
    net = DiTTransformer2DModel(
        num_attention_heads=d.dit_heads, attention_head_dim=d.dit_head_dim, in_channels=channels,
        out_channels=channels, num_layers=d.dit_depth, sample_size=size, patch_size=d.patch_size,
        num_embeds_ada_norm=max(d.num_classes, 1))  # an unconditional DiT sees class 0 throughout
    for m in net.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    for layer in [*(b.norm1.linear for b in net.transformer_blocks), net.proj_out_1, net.proj_out_2]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    # The repeated block: FSDP shards each one on its own (but the first, whose embedding the output layer also
    # reads), and train.compile compiles it once for all.
    net._no_split_modules = ["BasicTransformerBlock"]
    net._root_blocks = [net.transformer_blocks[0]]
    return net


def build_backbone(cfg: RunConfig, channels: int, size: int, text: tuple[int, int, int] | None = None) -> nn.Module:
    """The denoiser of diffusion.backbone; `text` = (tokens, width, pooled width) of a text condition."""
    build = {"unet": build_unet, "dit": build_dit, "mmdit": build_mmdit}[cfg.diffusion.backbone]
    return build(cfg, channels, size, text)


def call(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | dict[str, torch.Tensor] | None
         ) -> torch.Tensor:
    """The backbone's output at (x, t) under a condition: class labels, a text condition, or None."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    t = t.expand(x.shape[0])
    inner = net
    while isinstance(getattr(inner, "module", None), nn.Module):  # DDP's and DeepSpeed's wrappers
        inner = inner.module
    if not isinstance(cond, dict):
        if cond is None and isinstance(inner, DiTTransformer2DModel):
            cond = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return net(x, t, class_labels=cond).sample
    text, mask, pooled = cond["text"].to(x.dtype), cond["text_mask"], cond["text_pooled"].to(x.dtype)
    if isinstance(inner, SD3Transformer2DModel):  # no mask: padding tokens are zeros
        return net(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
    if isinstance(inner, PixArtTransformer2DModel):
        return net(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return net(x, t, encoder_hidden_states=text, encoder_attention_mask=mask, class_labels=pooled).sample
