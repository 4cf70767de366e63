"""Fine-tuning speed against diffusers' own training scripts, side by side in one run on the same pipeline, images,
resolution and batch: gen_dist's LoRA step against `examples/text_to_image/train_text_to_image_lora.py`, and its
full fine-tuning step against `train_text_to_image.py`; one process each, fp32, no EMA, sampling or checkpoints
in the timed steps. A step's time is the difference of two runs' wall times (N1 and N2 steps) over N2 - N1, so
start-up is not counted. Also the size of a LoRA run's checkpoint against its adapter's.

    python benchmarks/finetune_speed.py --diffusers /work/.mirror/huggingface+diffusers/repo \
        --python /tmp/dbench/bin/python [--n1 5 --n2 25 --batch 16 --resolution 32]

--diffusers is a clone of github.com/huggingface/diffusers (its scripts are read from HEAD); --python an
interpreter with the project's packages and `datasets` (the scripts' data loader). PyPI's torchvision does not load
beside the CPU build of torch, so the scripts run with benchmarks/shim/torchvision (their image transforms in
PIL), put on their path after transformers and peft are imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"lora": "train_text_to_image_lora.py", "full": "train_text_to_image.py"}
PREAMBLE = """import sys
import peft, transformers  # they decide what is installed before the shim is on the path
sys.path.insert(0, "{shim}")
"""


def small_sd(out: Path, resolution: int) -> Path:
    """A small Stable Diffusion pipeline: the tests' tiny CLIP and VAE, a 3-level cross-attention UNet."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from diffusers import UNet2DConditionModel
    from tinypipes import tiny_sd

    from gen_dist.pipelines import open_pipeline

    tiny_sd(out)
    torch.manual_seed(0)
    vae = open_pipeline(out).config("vae")
    unet = UNet2DConditionModel(sample_size=resolution // 2, in_channels=vae["latent_channels"],
                                out_channels=vae["latent_channels"], block_out_channels=(64, 128, 128),
                                down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, layers_per_block=2,
                                norm_num_groups=32, cross_attention_dim=32, attention_head_dim=4)
    unet.save_pretrained(out / "unet")
    return out


def image_folder(out: Path, n: int) -> tuple[Path, Path]:
    """n Fashion-MNIST training images as an imagefolder with captions (the scripts' data) and as shards with the
    same captions from templates (gen_dist's)."""
    from PIL import Image

    from gen_dist.data import Fields, Piece, decode_image, load_index, pack_arrays, read_pieces

    root = ROOT / "data" / "fashion_mnist"
    shard = load_index(root)["splits"]["train"]["shards"][0]
    samples = list(read_pieces([Piece(str(root / shard["file"]), 0, n)]))
    images = np.stack([decode_image(s, Fields(1, 28))[0] for s in samples])
    labels = np.array([int(s["cls"]) for s in samples])
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(image).convert("RGB").save(folder / f"{i:05d}.png")
            f.write(json.dumps({"file_name": f"{i:05d}.png", "text": f"a photo of a {NAMES[label]}"}) + "\n")
    pack_arrays(images, labels, out / "shards", "train", n, [str(c) for c in range(10)])
    return folder, out / "shards"


NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def diffusers_cmd(args: argparse.Namespace, script: Path, pipe: Path, folder: Path, out: Path, steps: int,
                  lr: str) -> list[str]:
    return [args.python, str(script), f"--pretrained_model_name_or_path={pipe}", f"--train_data_dir={folder}",
            f"--resolution={args.resolution}", "--center_crop", f"--train_batch_size={args.batch}",
            f"--max_train_steps={steps}", f"--learning_rate={lr}", "--lr_scheduler=constant", "--lr_warmup_steps=0",
            "--mixed_precision=no", "--dataloader_num_workers=0", f"--output_dir={out}", "--seed=0",
            "--checkpointing_steps=100000", "--report_to=tensorboard"]


def gen_dist_cmd(args: argparse.Namespace, pipe: Path, shards: Path, out: Path, steps: int, lora: bool) -> list[str]:
    d = "diffusion"
    return [sys.executable, "-m", "gen_dist", "train", str(ROOT / "configs" / "smoke_diffusion_finetune.yaml"),
            f"run_dir={out}", f"data.path={shards}", f"{d}.pretrained={pipe}", f"data.resolution={args.resolution}",
            f"data.batch_size={args.batch}", "data.num_workers=0", "data.hflip=false", f"train.steps={steps}",
            "train.ema_decay=0", "train.ckpt_every=100000", "train.sample_every=0", "train.log_every=10",
            "train.mixed_precision=no", "optim.schedule=constant", "optim.warmup_steps=0", "optim.grad_clip=1.0",
            f"optim.lr={1e-4 if lora else 1e-5}", "track.backends=[jsonl]", "data.caption_key=",
            "data.caption_templates=['a photo of a {class}']", f"data.class_names=[{','.join(NAMES)}]",
            f"{d}.num_classes=10", f"{d}.lora_rank={4 if lora else 0}", f"{d}.lora_alpha={4 if lora else 0}",
            f"{d}.text_max_length=[77]"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers", type=Path, required=True, help="a clone of huggingface/diffusers")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs diffusers' scripts")
    p.add_argument("--work", type=Path, default=Path("/tmp/finetune_speed"))
    p.add_argument("--n1", type=int, default=5)
    p.add_argument("--n2", type=int, default=25)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=32)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    pipe = small_sd(args.work / "pipeline", args.resolution)
    folder, shards = image_folder(args.work / "data", 512)
    env = {**os.environ, "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    print(f"pipeline: {pipe} (UNet 64/128/128, 2 layers per level), {args.resolution}px, batch {args.batch}, "
          f"1 process, fp32; s/step from {args.n1} and {args.n2} steps")
    print("| mode | diffusers script s/step | gen_dist s/step | gen_dist speed-up |")
    print("|---|---|---|---|")
    for mode, script in SCRIPTS.items():
        source = subprocess.run(["git", "-C", str(args.diffusers), "show", f"HEAD:examples/text_to_image/{script}"],
                                capture_output=True, text=True, check=True).stdout
        path = args.work / script
        path.write_text(PREAMBLE.format(shim=ROOT / "benchmarks" / "shim") + source)
        lr = "1e-4" if mode == "lora" else "1e-5"
        theirs = [timed(diffusers_cmd(args, path, pipe, folder, args.work / f"d_{mode}_{n}", n, lr), env)
                  for n in (args.n1, args.n2)]
        ours = [timed(gen_dist_cmd(args, pipe, shards, args.work / f"g_{mode}_{n}", n, mode == "lora"), env)
                for n in (args.n1, args.n2)]
        a, b = ((t[1] - t[0]) / (args.n2 - args.n1) for t in (theirs, ours))
        print(f"| {mode} | {a:.3f} | {b:.3f} | {a / b:.2f}x |", flush=True)
    ckpt = sorted((args.work / f"g_lora_{args.n2}" / "checkpoints").glob("step_*"))[-1]
    held = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    adapter = (ckpt / "model.safetensors").stat().st_size
    base = sum(f.stat().st_size for f in (pipe / "unet").glob("*.safetensors"))
    print(f"LoRA checkpoint: {held / 1e6:.2f} MB in all (adapter {adapter / 1e6:.2f} MB, with its EMA-less optimizer "
          f"state and schedule); the frozen UNet it adapts: {base / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
