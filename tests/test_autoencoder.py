"""Autoencoders and latent diffusion: the VQ-VAE's EMA codebook across ranks, the KL autoencoder's perceptual and
adversarial phases, reconstruction scores, and diffusion on a frozen first stage's latents."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, events, free_port, run_cli, smoke_args, step_records
from PIL import Image
from safetensors.torch import load_file

from gen_dist.config import load_config
from gen_dist.engine import Trainer
from gen_dist.schema import ConfigError
from gen_dist.tasks.autoencoder import VQVAETask

pytestmark = pytest.mark.xdist_group("autoencoder")  # one worker builds the shared first stage


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Consolidated raw and EMA weights (buffers included) of the sampled module in the last checkpoint."""
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    raw = ckpt / "weights.safetensors"
    raw = raw if raw.exists() else ckpt / "model.safetensors"
    return {**load_file(str(raw)), **{f"ema.{k}": v for k, v in load_file(str(ckpt / "ema.safetensors")).items()}}


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory: pytest.TempPathFactory, digits: Path) -> Path:
    """A smoke VQ-VAE run: the first stage of the latent diffusion tests."""
    run_dir = tmp_path_factory.mktemp("vq_first_stage")
    run_cli("train", *smoke_args("vqvae", run_dir, digits))
    return run_dir


# ------------------------------------------------------------------------------------------ codebook


def _vq_task() -> VQVAETask:
    torch.manual_seed(0)
    return VQVAETask(load_config(CONFIGS / "smoke_vqvae.yaml", ["vqvae.disc_weight=0", "vqvae.dead_threshold=0.5",
                                                                   "vqvae.codebook_decay=0"]))


def test_codebook_update_is_one_all_reduce_and_restarts_dead_codes() -> None:
    """Two 'ranks' (threads whose reduce is an all-reduce) with one micro-batch each end the step with the same
    codebook, equal to one process accumulating both micro-batches; unused codes restart on encoder outputs of
    the global batch's first micro-batch."""
    batches = [{"x": torch.rand(8, 1, 8, 8) * 2 - 1, "micro": i} for i in range(2)]
    ranks = [_vq_task() for _ in range(2)]
    barrier, shared = threading.Barrier(2), {}
    out: dict[int, dict] = {}

    for i, task in enumerate(ranks):
        torch.manual_seed(100 + i)  # the engine seeds each micro-batch by its global index
        task.loss(task.modules, batches[i], 0)

    def rank(i: int) -> None:
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            shared[i] = t.clone()
            barrier.wait()
            total = shared[0] + shared[1]
            barrier.wait()
            return t.copy_(total)

        out[i] = ranks[i].after_step(ranks[i].modules, all_reduce, 0)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    books = [t.modules["vqvae"].quantize for t in ranks]
    assert torch.equal(books[0].embedding, books[1].embedding) and out[0]["vq/codebook_drift"] == 0
    one = _vq_task()
    net = one.modules["vqvae"]
    for i, batch in enumerate(batches):
        torch.manual_seed(100 + i)
        one.loss({"vqvae": net}, batch, 0)
    one.after_step({"vqvae": net}, lambda t: t, 0)
    torch.testing.assert_close(net.quantize.embedding, books[0].embedding, rtol=1e-5, atol=1e-6)
    # Codes that no vector chose were restarted on rows of micro-batch 0's latents.
    restarted = int(out[0]["vq/restarted"])
    assert 0 < restarted < 16
    with torch.no_grad():
        h = net.encode(batches[0]["x"]).permute(0, 2, 3, 1).reshape(-1, 4)
    matches = sum(bool((h - row).abs().max(dim=1).values.min() < 1e-6) for row in books[0].embedding)
    assert matches >= restarted
    # The FLOP count's batch (no `micro`) adds nothing to the step.
    one.loss({"vqvae": net}, {"x": batches[0]["x"]}, 1)
    with pytest.raises(RuntimeError, match="no training micro-batch"):
        one.after_step({"vqvae": net}, lambda t: t, 1)


def test_vqvae_on_two_ranks_equals_one_process_with_one_codebook(tmp_path: Path, digits: Path) -> None:
    """2 FSDP ranks x 1 micro-batch == 1 process x 2 accumulated micro-batches, codebook included; every rank
    entered every step with the same codebook (FSDP does not broadcast buffers, so this is the reduction's
    doing); usage and perplexity are logged; grids show originals above reconstructions."""
    common = ["data.batch_size=8", "train.steps=4", "train.ckpt_every=4", "train.log_every=1", "optim.grad_clip=0",
              "vqvae.disc_start=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli("train", *smoke_args("vqvae", one, digits), *common, "train.grad_accum=2", "data.num_workers=2")
    run_cli("launch", *smoke_args("vqvae", two, digits), *common, "data.num_workers=0", "parallel.strategy=fsdp",
            "--nproc", "2", "--port", free_port())
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys() and "quantize.embedding" in a
    for k in a:
        # Biases in front of a GroupNorm have a true gradient of 0: Adam turns the rounding differences of an
        # all-reduce against local accumulation into steps of up to lr (1e-3) each. The codebook and the losses
        # below show the two runs agree.
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=4e-3 if k.endswith("bias") else 2e-4, msg=k)
    for k in ("quantize.embedding", "quantize.ema_count", "ema.quantize.embedding"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)
    records = step_records(two)
    for r, s in zip(step_records(one), records, strict=True):
        assert r["recon/loss"] == pytest.approx(s["recon/loss"], rel=1e-5)
        assert (r["vq/usage"], r["vq/restarted"]) == (s["vq/usage"], s["vq/restarted"])
    assert [r["vq/codebook_drift"] for r in records] == [0.0] * 4
    assert records[0]["vq/restarted"] > 0 and all(0 < r["vq/usage"] <= 1 for r in records)
    assert all(1 < r["vq/perplexity"] <= 16 for r in records)
    (grid,) = (two / "samples").glob("*.png")
    from PIL import Image

    assert Image.open(grid).size[1] > Image.open(grid).size[0] / 10 * 2  # pairs of rows


# ------------------------------------------------------------------------------------------ KL autoencoder


def test_autoencoder_with_perceptual_loss_and_late_discriminator(tmp_path: Path, digits: Path) -> None:
    """The perceptual term uses a frozen classifier run; the discriminator phase starts at disc_start; eval
    scores reconstructions (PSNR, rFID); an export samples without the classifier's files."""
    classifier = tmp_path / "classifier"
    run_cli("train", str(CONFIGS / "smoke_classifier.yaml"), f"run_dir={classifier}", f"data.path={digits}")
    run_dir = tmp_path / "ae"
    run_cli("train", *smoke_args("autoencoder", run_dir, digits), f"autoencoder.perceptual={classifier}",
            "autoencoder.disc_start=3", "train.log_every=1", "train.activation_checkpointing=true")
    records = step_records(run_dir)
    assert all("recon/perceptual" in r and "recon/kl" in r for r in records)
    assert [("disc/loss" in r, "recon/adversarial" in r) for r in records] == [(False, False)] * 3 + [(True, True)] * 3
    proc = run_cli("eval", str(run_dir), "eval.n=20", f"eval.extractors=[{classifier}]", "eval.metrics=[fid]")
    report = json.loads((run_dir / "eval" / "step_00000006.json").read_text())["scores"]
    assert 5 < report["eval/psnr"] < 60 and report["eval/domain/fid20"] > 0, proc.stdout
    run_cli("export", str(run_dir), "--out", str(tmp_path / "ae.safetensors"))
    with pytest.raises(ConfigError, match=f"perceptual: {run_dir} holds a model of task autoencoder, not a classifier"):
        load_config(CONFIGS / "smoke_autoencoder.yaml", [f"autoencoder.perceptual={run_dir}"])
    shutil.rmtree(classifier)
    run_cli("sample", str(tmp_path / "ae.safetensors"), "--n", "10", "--out", str(tmp_path / "recon.png"))
    run_cli("sample", str(run_dir), "--n", "10", "--out", str(tmp_path / "recon_run.png"))  # the run too
    assert (tmp_path / "recon.png").is_file() and (tmp_path / "recon_run.png").is_file()


# ------------------------------------------------------------------------------------------ latent diffusion

LATENT = ["diffusion.channels=[16]", "diffusion.attention=[true]"]


def test_latent_diffusion_resumes_exactly_keeps_its_first_stage_and_exports_it(
        first_stage: Path, tmp_path: Path, digits: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [*LATENT, f"diffusion.first_stage={first_stage}"]
    run_cli("train", *smoke_args("diffusion", straight, digits, *args), "train.ckpt_every=100")
    run_cli("train", *smoke_args("diffusion", resumed, digits, *args), "train.steps=3")
    run_cli("train", *smoke_args("diffusion", resumed, digits, *args))
    a, b = _weights(straight), _weights(resumed)
    assert a["conv_in.weight"].shape[1] == 4  # the UNet sees the 4 latent channels, not the image's 1
    for k in a:
        assert torch.equal(a[k], b[k]), k
    metas = [json.loads((sorted((d / "checkpoints").glob("step_*"))[-1] / "meta.json").read_text())
             for d in (straight, resumed)]
    scale = metas[0]["state"]["task"]["latent_scale"]
    assert scale == metas[1]["state"]["task"]["latent_scale"] and 0.01 < scale < 100
    out = tmp_path / "ldm.safetensors"
    run_cli("export", str(straight), "--out", str(out))
    moved = tmp_path / "moved_first_stage"
    shutil.copytree(first_stage, moved)
    shutil.rmtree(first_stage)
    try:
        run_cli("sample", str(out), "--n", "10", "--out", str(tmp_path / "ldm.png"))
        bad = run_cli("sample", str(straight), "--n", "10", "--out", str(tmp_path / "x.png"), check=False)
        assert bad.returncode == 2 and f"diffusion.first_stage: {first_stage} does not exist" in bad.stderr
    finally:
        shutil.copytree(moved, first_stage)
    assert (tmp_path / "ldm.png").is_file()


def test_first_stage_stays_frozen_and_bad_first_stages_fail_before_training(
        first_stage: Path, tmp_path: Path, digits: Path) -> None:
    cfg = load_config(CONFIGS / "smoke_diffusion.yaml", [f"run_dir={tmp_path / 'run'}", f"data.path={digits}",
                                                         "track.backends=[jsonl]", "train.steps=2", *LATENT,
                                                         f"diffusion.first_stage={first_stage}"])
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.frozen["first_stage"].state_dict().items()}
    trainer.train()
    after = trainer.frozen["first_stage"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in trainer.frozen["first_stage"].parameters())
    assert events(tmp_path / "run", "end")
    for value, message in ((str(tmp_path / "nowhere"), "does not exist"),
                           (str(tmp_path / "run"), "is a diffusion model, not an autoencoder")):
        with pytest.raises(ConfigError, match=message):
            load_config(CONFIGS / "smoke_diffusion.yaml", [f"data.path={digits}", f"diffusion.first_stage={value}"])
    # The DiT with EDM on the same latents: trained, sampled and decoded to images.
    dit = ["diffusion.backbone=dit", "diffusion.objective=edm", "diffusion.dit_depth=2", "diffusion.dit_heads=2",
           "diffusion.dit_head_dim=8", "diffusion.patch_size=2"]
    cfg = load_config(CONFIGS / "smoke_diffusion.yaml", [f"run_dir={tmp_path / 'dit'}", f"data.path={digits}",
                                                         "track.backends=[jsonl]", "train.steps=2", *LATENT, *dit,
                                                         f"diffusion.first_stage={first_stage}", "train.sample_n=4"])
    Trainer(cfg).train()
    grid = np.asarray(Image.open(tmp_path / "dit" / "samples" / "step_00000002.png"))
    assert grid.std() > 0
    with pytest.raises(ConfigError, match="patch_size=3 does not divide the first stage's latent resolution 4"):
        load_config(CONFIGS / "smoke_diffusion.yaml", [f"data.path={digits}", f"diffusion.first_stage={first_stage}",
                                                       *dit, "diffusion.patch_size=3"])
    with pytest.raises(ConfigError, match="latent resolution 4 must be divisible by 8"):
        load_config(CONFIGS / "smoke_diffusion.yaml", [f"data.path={digits}", f"diffusion.first_stage={first_stage}",
                                                       "diffusion.channels=[8,8,8,8]",
                                                       "diffusion.attention=[false,false,false,false]"])


def test_pre_encoded_latents_give_the_batches_of_on_the_fly_encoding(
        first_stage: Path, tmp_path: Path, digits: Path) -> None:
    latents = tmp_path / "latents"
    run_cli("data", "latents", str(first_stage), "--data", str(digits), "--out", str(latents))
    index = json.loads((latents / "index.json").read_text())
    assert index["splits"]["train"] == json.loads((digits / "index.json").read_text())["splits"]["train"]
    common = [f"data.path={digits}", "track.backends=[jsonl]", "data.hflip=false", *LATENT,
              f"diffusion.first_stage={first_stage}"]
    fly = Trainer(load_config(CONFIGS / "smoke_diffusion.yaml", [f"run_dir={tmp_path / 'fly'}", *common]))
    pre = Trainer(load_config(CONFIGS / "smoke_diffusion.yaml", [f"run_dir={tmp_path / 'pre'}", *common,
                                                                 f"data.latents={latents}"]))
    for a, b in zip(fly.feed.batches(), pre.feed.batches()):  # noqa: B905 - endless streams
        assert a["key"] == b["key"] and torch.equal(a["label"], b["label"]) and "x" not in b
        encoded = fly.task.latents(fly.frozen, {**a, "micro": 0})
        torch.testing.assert_close(pre.task.latents(pre.frozen, {**b, "micro": 0}), encoded, rtol=1e-5, atol=1e-5)
        if fly.feed.positions[0].batch == 3:
            break
    assert fly.task.latent_scale == pre.task.latent_scale  # measured on data.path's images either way
    with pytest.raises(ConfigError, match="data.hflip cannot flip pre-encoded latents"):
        load_config(CONFIGS / "smoke_diffusion.yaml", [*common, f"data.latents={latents}", "data.hflip=true"])
    with pytest.raises(ConfigError, match="holds images, not latents"):
        Trainer(load_config(CONFIGS / "smoke_diffusion.yaml", [f"run_dir={tmp_path / 'x'}", *common,
                                                               f"data.latents={digits}"]))
