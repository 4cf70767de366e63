"""The image sizes a diffusion run trains on (data.resolution's square, or data.buckets' table) and whether its
model takes them: whole UNet levels or DiT patches, in the first stage's latents too."""

from __future__ import annotations

from gen_dist.schema import ConfigError, RunConfig
from gen_dist.tasks.latents import latent_shape


def image_sizes(cfg: RunConfig) -> list[tuple[int, int]]:
    """(height, width) of the images the model trains on: data.resolution's square, or each of data.buckets."""
    d = cfg.data
    if not d.buckets:
        return [(d.resolution, d.resolution)]
    from gen_dist.data.buckets import bucket_table
    from gen_dist.data.shards import DataError

    try:
        return bucket_table(d.buckets, d.resolution, d.bucket_multiple, d.bucket_max_ratio)
    except DataError as e:
        raise ConfigError(str(e)) from None



def check_sizes(cfg: RunConfig) -> None:
    """The model takes data.resolution, or every bucket: whole UNet levels or patches, in latents too."""
    d = cfg.diffusion
    factor = cfg.data.resolution // latent_shape(cfg)[1] if d.first_stage else 1
    where = "the first stage's latent resolution" if d.first_stage else "data.resolution"
    for h, w in image_sizes(cfg):
        side = f"{where} {h // factor}" if not cfg.data.buckets else \
            f"the bucket {h}x{w} of data.buckets={cfg.data.buckets}" + (
                f" ({h // factor}x{w // factor} latents)" if factor > 1 else "")
        lh, lw = h // factor, w // factor
        if h % factor or w % factor:
            raise ConfigError(f"{side} must be divisible by {factor}, the first stage's downsampling")
        if d.backbone == "unet" and (lh % 2 ** (len(d.channels) - 1) or lw % 2 ** (len(d.channels) - 1)):
            raise ConfigError(f"{side} must be divisible by {2 ** (len(d.channels) - 1)} for {len(d.channels)} "
                              f"UNet levels")
        if d.backbone == "dit" and (lh % d.patch_size or lw % d.patch_size):
            raise ConfigError(f"diffusion.patch_size={d.patch_size} does not divide {side}: the DiT cuts the "
                              f"image into whole patches")
