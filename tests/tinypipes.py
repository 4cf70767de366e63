"""Tiny randomly initialised diffusers pipelines (SD, SDXL, PixArt, SD3, Flux), saved with `save_pretrained`:
fine-tuning tests without a hub. Images are 32x32 pixels; every VAE has two levels, so latents are 16x16."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from textenc import WORDS

SIZE = 32  # image side in pixels
LATENT = SIZE // 2  # two VAE levels halve the side once
CLIP_LENGTH = 77  # SD prompts are 77 CLIP tokens
T5_LENGTH = 512  # T5 has relative positions; pipelines pass their own max_sequence_length


def _clip_tokenizer() -> Any:
    """A CLIPTokenizer whose BPE spells every word of WORDS as one token and falls back to single bytes."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    # All 256 byte-level symbols, bare and word-final, as real CLIP has them: any text tokenizes without <unk>
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = [*alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[str] = []
    # Longest words first: their merges then outrank any shorter word's merge that would split them
    for word in sorted(WORDS, key=len, reverse=True):
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merge = f"{symbols[0]} {symbols[1]}"
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            if merge not in merges:
                merges.append(merge)
                vocab.append(symbols[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # last, as in CLIP, so the end token has the largest id
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=CLIP_LENGTH)
    assert all(len(tok(w).input_ids) == 3 for w in WORDS)  # <start> word <end>
    return tok


def _t5_tokenizer() -> Any:
    """A T5TokenizerFast over a Unigram model: one piece per word of WORDS, single characters for the rest."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # T5's layout (<pad> 0, </s> 1, <unk> 2): transformers rebuilds a saved T5 tokenizer assuming it
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    # No sentinel <extra_id_*> tokens: only a text encoder is used, never a decoder
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                           model_max_length=T5_LENGTH)


def _clip(tok: Any, width: int, projection: int | None = None) -> Any:
    """A 2-layer CLIP text encoder of hidden size `width`, with a `projection`-wide text projection if given."""
    import transformers as tf

    # Two layers, so the penultimate hidden state that SDXL and SD3 read is a transformer layer's output
    config = tf.CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=CLIP_LENGTH,
                               projection_dim=projection or width, pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return tf.CLIPTextModelWithProjection(config) if projection else tf.CLIPTextModel(config)


def _t5(tok: Any, width: int = 32) -> Any:
    """A 1-layer T5 v1.1-style (gated GELU) encoder of width `width`."""
    import transformers as tf

    return tf.T5EncoderModel(tf.T5Config(vocab_size=len(tok), d_model=width, d_kv=width // 2, d_ff=2 * width,
                                         num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                         decoder_start_token_id=tok.pad_token_id))


def _vae(latent_channels: int = 4, scaling_factor: float = 0.18215, shift_factor: float | None = None) -> Any:
    """A two-level AutoencoderKL for 3-channel 32x32 images; 16-channel latents get no quant convs, as SD3 and Flux."""
    from diffusers import AutoencoderKL

    quant = latent_channels == 4
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=SIZE,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=quant,
                         use_post_quant_conv=quant)


def _sd_betas() -> dict[str, Any]:
    """The noise schedule of SD 1.x, 2.x and XL."""
    return {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _save(pipe: Any, out: Path) -> Path:
    """Save `pipe` at `out` and return `out`."""
    pipe.save_pretrained(out)
    return out


def tiny_sd(out: Path, prediction: str = "epsilon") -> Path:
    """A tiny StableDiffusionPipeline: SD 1.x with "epsilon", SD 2.x-768 style with "v_prediction"."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok = _clip_tokenizer()
    unet = UNet2DConditionModel(sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2)
    # SD's own scheduler settings (PLMS without the Runge-Kutta warm-up)
    scheduler = PNDMScheduler(**_sd_betas(), skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                              prediction_type=prediction)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(tok, 32), tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return _save(pipe, out)


def tiny_sdxl(out: Path) -> Path:
    """A tiny StableDiffusionXLPipeline with SDXL's two CLIP text encoders and size/crop conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok = _clip_tokenizer()
    width, projection, time_dim = 16, 16, 8
    unet = UNet2DConditionModel(sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True,
                                # both encoders' hidden states are concatenated
                                cross_attention_dim=2 * width, addition_embed_type="text_time",
                                addition_time_embed_dim=time_dim,
                                # the pooled projection and six size/crop numbers, each embedded in time_dim
                                projection_class_embeddings_input_dim=projection + 6 * time_dim)
    scheduler = EulerDiscreteScheduler(**_sd_betas(), steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_vae(scaling_factor=0.13025), text_encoder=_clip(tok, width),
                                     text_encoder_2=_clip(tok, width, projection), tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=scheduler)
    return _save(pipe, out)


def tiny_pixart(out: Path, sigma: bool = True) -> Path:
    """A tiny PixArtSigmaPipeline, or PixArtAlphaPipeline when not `sigma`, with a T5 text encoder."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(0)
    tok = _t5_tokenizer()
    # out_channels twice the latent channels: PixArt also predicts the variance, which its pipelines drop
    transformer = PixArtTransformer2DModel(sample_size=LATENT, patch_size=2, in_channels=4, out_channels=8,
                                           num_layers=1, num_attention_heads=4, attention_head_dim=8,
                                           cross_attention_dim=32, caption_channels=32)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
                                            beta_end=0.02, algorithm_type="dpmsolver++", solver_order=2)
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    # Sigma uses SDXL's VAE, Alpha SD's
    pipe = cls(tokenizer=tok, text_encoder=_t5(tok), vae=_vae(scaling_factor=0.13025 if sigma else 0.18215),
               transformer=transformer, scheduler=scheduler)
    return _save(pipe, out)


def tiny_sd3(out: Path) -> Path:
    """A tiny StableDiffusion3Pipeline: MMDiT, two CLIP text encoders and T5, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    width, t5_width = 16, 32  # the pipeline pads the concatenated CLIP states (2 * width) to T5's width
    transformer = SD3Transformer2DModel(sample_size=LATENT, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, num_attention_heads=4, attention_head_dim=8,
                                        joint_attention_dim=t5_width, caption_projection_dim=32,
                                        pooled_projection_dim=2 * width, pos_embed_max_size=2 * LATENT)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609),
                                    text_encoder=_clip(clip_tok, width, width), tokenizer=clip_tok,
                                    text_encoder_2=_clip(clip_tok, width, width), tokenizer_2=clip_tok,
                                    text_encoder_3=_t5(t5_tok, t5_width), tokenizer_3=t5_tok)
    return _save(pipe, out)


def tiny_flux(out: Path, guidance: bool = False) -> Path:
    """A tiny FluxPipeline; `guidance` embeds the guidance scale, as FLUX.1-dev does."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    # 16 latent channels packed in 2x2 patches make 64 input channels; the rope axes split the 16-wide heads
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    # FLUX.1-dev's schedule: the shift grows with the number of image tokens
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=_clip(clip_tok, 32), tokenizer=clip_tok, text_encoder_2=_t5(t5_tok),
                        tokenizer_2=t5_tok, transformer=transformer)
    return _save(pipe, out)
