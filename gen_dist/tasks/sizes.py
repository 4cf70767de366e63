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
    if d.backbone == "unet":
        multiple, why = 2 ** (len(d.channels) - 1), f"for {len(d.channels)} UNet levels"
    elif d.backbone == "dit":
        multiple, why = d.patch_size, f"for diffusion.patch_size={d.patch_size} (the DiT cuts whole patches)"
    else:
        return
    where = f"(a {factor}x-downsampling first stage's latents)" if factor > 1 else ""
    for h, w in image_sizes(cfg):
        if h % (multiple * factor) or w % (multiple * factor):
            what = f"the bucket {h}x{w} of data.buckets={cfg.data.buckets}" if cfg.data.buckets else \
                f"data.resolution {h}"
            raise ConfigError(f"{what} must be divisible by {multiple * factor} {where} {why}")
