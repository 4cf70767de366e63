"""The built-in model families, one module each; every module registers its family with `gen_dist.family` when
imported (`gen_dist.family.families()` imports them all)."""
