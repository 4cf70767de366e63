"""The part of torchvision that diffusers' text-to-image training scripts use (image transforms), for running them
beside gen_dist in benchmarks/finetune_speed.py: PyPI's torchvision does not load beside the CPU build of torch
that gen_dist installs. PIL and torch only; the scripts' model code is untouched."""
