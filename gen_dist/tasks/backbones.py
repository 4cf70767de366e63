"""The denoising networks of diffusion, built from diffusers' classes: a UNet and a DiT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from gen_dist.schema import RunConfig

if TYPE_CHECKING:
    from diffusers import UNet2DModel


def build_unet(cfg: RunConfig, channels: int, size: int) -> UNet2DModel:
    from diffusers import UNet2DModel

    d = cfg.diffusion
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


def build_dit(cfg: RunConfig, channels: int, size: int) -> nn.Module:
    """diffusers' DiT with adaLN-Zero's zero initialisation (every block starts as the identity, the output at
    zero; Peebles & Xie 2023). Its label embeddings keep their null class (index num_classes) but do not drop
    labels themselves: each block has its own embedding, and a drop must be the same in all of them, so the
    task drops labels once (diffusion.label_dropout) before the call."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import LabelEmbedding

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


def build_backbone(cfg: RunConfig, channels: int, size: int) -> nn.Module:
    return (build_dit if cfg.diffusion.backbone == "dit" else build_unet)(cfg, channels, size)
