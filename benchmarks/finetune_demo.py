"""The fine-tuning demo's numbers, measured on what users load: samples drawn by diffusers itself from the base
pipeline, from the base with the exported LoRA (`load_lora_weights`) and from exported full fine-tunes, scored by
the domain classifier: prompt accuracy on the classes the base never saw and on those it knew (what a fine-tune
forgets), and domain FID of each group against its test images.

    python benchmarks/finetune_demo.py --base models/sd_fashion_base --classifier runs/finetune_demo/classifier \
        --lora runs/finetune_demo/lora_export --full runs/finetune_demo/full_export [--n 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from gen_dist.data import Fields, Piece, decode_image, load_index, read_pieces
from gen_dist.metrics import fid
from gen_dist.tasks.classifier import DomainClassifier

NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
NEW = [1, 8]


def load(base: Path, lora: Path | None = None, full: Path | None = None):
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    pipe = DiffusionPipeline.from_pretrained(full or base)
    if lora is not None:
        pipe.load_lora_weights(lora)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def samples(pipe, label: int, n: int, seed: int) -> torch.Tensor:
    """n images of class `label`'s prompt (uint8, N 1 H W: the grey the classifier takes)."""
    out = []
    for start in range(0, n, 50):
        k = min(50, n - start)
        images = pipe(prompt=[f"a photo of a {NAMES[label]}"] * k, num_inference_steps=10, guidance_scale=2.0,
                      height=32, width=32, output_type="np",
                      generator=torch.Generator().manual_seed(seed + start)).images
        out.append(torch.from_numpy((images.mean(-1, keepdims=True) * 255).round().astype(np.uint8)))
    return torch.cat(out).permute(0, 3, 1, 2)


def test_images(label: int, n: int) -> torch.Tensor:
    root = Path("data/fashion_mnist")
    shards = load_index(root)["splits"]["test"]["shards"]
    found = [s for s in read_pieces([Piece(str(root / s["file"]), 0, s["count"]) for s in shards])
             if int(s["cls"]) == label][:n]
    return torch.from_numpy(np.stack([decode_image(s, Fields(1, 28)) for s in found]))


def score(pipe, classifier: DomainClassifier, n: int, reference: dict[int, np.ndarray]) -> dict[str, float]:
    hits, feats = {}, {}
    for label in range(10):
        h, logits = classifier(samples(pipe, label, n, seed=1000 * label))
        hits[label] = float((logits.argmax(1) == label).float().mean())
        feats[label] = h.cpu().numpy()
    out = {}
    for group, labels in (("new", NEW), ("old", [c for c in range(10) if c not in NEW])):
        out[f"{group}/accuracy"] = float(np.mean([hits[c] for c in labels]))
        out[f"{group}/fid"] = fid(np.concatenate([reference[c] for c in labels]),
                                  np.concatenate([feats[c] for c in labels]))
    out.update({f"accuracy/{NAMES[c]}": hits[c] for c in range(10)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--classifier", type=Path, required=True)
    p.add_argument("--lora", type=Path, action="append", default=[], help="an exported LoRA (repeatable)")
    p.add_argument("--full", type=Path, action="append", default=[], help="an exported pipeline (repeatable)")
    p.add_argument("--n", type=int, default=100, help="samples per class")
    p.add_argument("--out", type=Path, help="write the scores as JSON here")
    p.add_argument("--grid", type=Path, help="write a PNG: per model, a row of 8 samples for each of the new "
                   "classes and two old ones")
    args = p.parse_args()
    classifier = DomainClassifier(args.classifier, torch.device("cpu"))
    reference = {c: classifier(test_images(c, 1000))[0].cpu().numpy() for c in range(10)}
    models = {"base": load(args.base), **{f"lora {x}": load(args.base, lora=x) for x in args.lora},
              **{f"full {x}": load(args.base, full=x) for x in args.full}}
    results = {}
    print("| model | new-class accuracy | old-class accuracy | new-class domain FID | old-class domain FID |")
    print("|---|---|---|---|---|")
    for name, pipe in models.items():
        t0 = time.perf_counter()
        r = results[name] = score(pipe, classifier, args.n, reference)
        print(f"| {name} | {r['new/accuracy']:.1%} | {r['old/accuracy']:.1%} | {r['new/fid']:.2f} | "
              f"{r['old/fid']:.2f} |  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    if args.grid:
        write_grid(models, args.grid)


def write_grid(models: dict, out: Path) -> None:
    from PIL import Image

    rows = [torch.cat(list(samples(pipe, label, 8, seed=7)[:, 0]), dim=1) for pipe in models.values()
            for label in (*NEW, 7, 3)]
    Image.fromarray(torch.cat(rows, dim=0).numpy()).resize((8 * 64, len(rows) * 64), Image.NEAREST).save(out)
    print(f"grid: {out} (rows: {', '.join(f'{m} {NAMES[c]}' for m in models for c in (*NEW, 7, 3))})")


if __name__ == "__main__":
    main()
