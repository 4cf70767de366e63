"""gen_dist: distributed training of diffusion models, GANs and VAEs."""

__version__ = "0.1.0"
