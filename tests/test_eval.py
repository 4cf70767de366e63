"""Evaluation: the domain classifier trained by gen_dist, the offline Inception extractor, metrics computed
during training across ranks against the same metrics offline in one process, and eval config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, events, records, run_cli, smoke_args, step_records, train_command

from gen_dist.data import Fields, Piece, decode_image, load_index, read_pieces
from gen_dist.evaluation import STATS_DIR, InceptionV3
from gen_dist.metrics import fid
from gen_dist.tasks.classifier import DomainClassifier

EVAL = ["eval.every=3", "eval.n=40", "eval.batch_size=16", "eval.metrics=[fid,kid,pr,is]"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory, digits: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("classifier")
    run_cli("train", str(CONFIGS / "smoke_classifier.yaml"), f"run_dir={run_dir}", f"data.path={digits}")
    return run_dir


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One CPU thread per process, as launched ranks get on this machine: a different thread count splits the
    float reductions of a convolution differently and moves the scores in the 5th digit."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _test_images(digits: Path) -> tuple[torch.Tensor, torch.Tensor]:
    shards = load_index(digits)["splits"]["test"]["shards"]
    raw = list(read_pieces([Piece(str(digits / s["file"]), 0, s["count"]) for s in shards]))
    images = torch.from_numpy(np.stack([decode_image(s, Fields(1, 8)) for s in raw]))
    return images, torch.tensor([int(s["cls"]) for s in raw])


def test_domain_classifier_features_tell_classes_and_noise_apart(classifier: Path, digits: Path) -> None:
    """Trained by gen_dist on the train split: it classifies the test split, and the FID on its features is 0
    for a set against itself and grows with the pixel noise added to it."""
    net = DomainClassifier(classifier, torch.device("cpu"))
    images, labels = _test_images(digits)
    feats, logits = net(images)
    assert feats.shape == (len(images), 32)
    assert (logits.argmax(1) == labels).float().mean() > 0.6
    clean = feats.double().numpy()
    assert abs(fid(clean, clean)) < 1e-6
    gen = torch.Generator().manual_seed(0)
    scores = []
    for sigma in (8, 32, 96):
        noisy = (images.float() + sigma * torch.randn(images.shape, generator=gen)).clamp(0, 255).round()
        scores.append(fid(clean, net(noisy.to(torch.uint8))[0].double().numpy()))
    assert 0 < scores[0] < scores[1] < scores[2]


def test_eval_during_training_on_two_ranks_equals_eval_in_one_process(tmp_path: Path, digits: Path,
                                                                      classifier: Path, one_thread: None) -> None:
    """Samples and features made on 2 ranks and gathered give the scores one process gets offline from the same
    checkpoint: the sample set does not depend on the world size. 40 samples in chunks of 16 leave rank 1 a
    short chunk."""
    run_dir = tmp_path / "run"
    run_cli(*train_command(2, *smoke_args("diffusion", run_dir, digits), *EVAL, f"eval.extractors=[{classifier}]"))
    logged = {r["step"]: r for r in records(run_dir) if "eval/domain/fid40" in r and "event" not in r}
    assert sorted(logged) == [3, 6]
    names = {k for k in logged[6] if k.startswith("eval/")}
    assert names == {f"eval/domain/{m}40" for m in ("fid", "kid", "precision", "recall", "is")} | {
        "eval/domain/kid40_std", "eval/domain/is40_std", "eval/seconds"}
    assert 0 < logged[6]["eval/domain/recall40"] <= 1 and logged[6]["eval/domain/fid40"] > 0
    assert list((digits / STATS_DIR).glob("test-*-1x8px-*-domain-*.npy"))  # cached beside the shards

    proc = run_cli("eval", str(run_dir), "--cpu")
    report = json.loads((run_dir / "eval" / "step_00000006.json").read_text())
    assert report["world_size"] == 1 and "eval/domain/fid40" in proc.stdout
    for key in names - {"eval/seconds"}:
        assert report["scores"][key] == pytest.approx(logged[6][key], rel=1e-9, abs=1e-12), key


def test_offline_eval_on_two_processes_equals_one(tmp_path: Path, digits: Path, classifier: Path,
                                                  one_thread: None) -> None:
    run_dir = tmp_path / "run"
    run_cli(*train_command(1, *smoke_args("vae", run_dir, digits)))
    args = ["eval", str(run_dir), "--cpu", "--n", "30", "--batch-size", "8", "--metrics", "fid,kid",
            "--extractors", str(classifier)]
    run_cli(*args)
    one = json.loads((run_dir / "eval" / "step_00000006.json").read_text())
    run_cli(*args, "--nproc", "2")
    two = json.loads((run_dir / "eval" / "step_00000006.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("eval/domain/fid30", "eval/domain/kid30"):
        assert two["scores"][key] == pytest.approx(one["scores"][key], rel=1e-9), key


def test_inception_extractor_loads_offline_and_reports_fid(tmp_path: Path, digits: Path) -> None:
    """The TorchScript InceptionV3 from the installed wheel (sha1 checked): 2048-d features of grey images;
    `gen-dist eval` names the Inception Score it cannot give."""
    net = InceptionV3(torch.device("cpu"))
    images, _ = _test_images(digits)
    a = net(images[:3])[0]
    assert a.shape == (3, 2048) and torch.isfinite(a).all()
    assert torch.equal(net(images[:3])[0], a) and not torch.allclose(a[0], a[1])
    run_dir = tmp_path / "run"
    run_cli(*train_command(1, *smoke_args("gan", run_dir, digits)))
    proc = run_cli("eval", str(run_dir), "--cpu", "--n", "6", "--reference-n", "6", "--metrics", "fid,is",
                   "--extractors", "inception")
    assert "eval/inception/fid6" in proc.stdout and "not computed: inception/is" in proc.stdout


@pytest.mark.parametrize(("override", "message"), [
    ("eval.metrics=[fid,lpips]", "eval.metrics must be"),
    ("eval.extractors=[/no/such/run]", "neither 'inception' nor an existing classifier"),
    ("eval.reference_split=valid", "eval.reference_split 'valid' is not in"),
])
def test_bad_eval_settings_fail_before_launch(override: str, message: str, tmp_path: Path, digits: Path) -> None:
    proc = run_cli(*train_command(2, *smoke_args("diffusion", tmp_path / "run", digits), "eval.every=3", override),
                   check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_snapshots_and_best_checkpoint_across_a_resume(tmp_path: Path, digits: Path, classifier: Path,
                                                      one_thread: None) -> None:
    """Two ranks evaluate every 2 steps, snapshot every 2 and keep one rolling checkpoint plus the best one; the
    run is resumed for 4 more steps. Every snapshot stays, the best checkpoint is the one of the lowest FID logged,
    and `eval --snapshots` afterwards scores each snapshot as the training ranks scored those weights."""
    run_dir = tmp_path / "run"
    best_key = "eval/domain/fid20"
    common = [*smoke_args("diffusion", run_dir, digits), "eval.every=2", "eval.n=20", "eval.batch_size=16",
              f"eval.extractors=[{classifier}]", "train.snapshot_every=2", "train.ckpt_every=2",
              "train.keep_checkpoints=1", f"train.keep_best={best_key}"]
    run_cli(*train_command(2, *common))
    run_cli(*train_command(2, *common, "train.steps=10"))
    assert [e["step"] for e in events(run_dir, "resume")] == [6]
    fids = {r["step"]: r[best_key] for r in step_records(run_dir) if best_key in r}
    assert sorted(fids) == [2, 4, 6, 8, 10]
    best_step = min(fids, key=fids.get)
    best = json.loads((run_dir / "best.json").read_text())
    assert (best["metric"], best["step"], best["value"]) == (best_key, best_step, fids[best_step])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(
        {f"step_{best_step:08d}", "step_00000010"})
    assert sorted(p.name for p in (run_dir / "snapshots").glob("*.safetensors")) == [
        f"step_{s:08d}.safetensors" for s in (2, 4, 6, 8, 10)]

    proc = run_cli("eval", str(run_dir), "--snapshots", "--cpu")
    curve = json.loads((run_dir / "eval" / "snapshots.json").read_text())
    assert {c["step"]: c[best_key] for c in curve} == pytest.approx(fids, rel=1e-9)
    logged = {r["step"]: r["snapshots/domain/fid20"] for r in step_records(run_dir) if "snapshots/domain/fid20" in r}
    assert logged == pytest.approx(fids, rel=1e-9) and "domain/fid20" in proc.stdout
    run_cli("eval", str(run_dir), "--snapshots", "--cpu")  # scored before: nothing new in the logs
    assert len([r for r in step_records(run_dir) if "snapshots/domain/fid20" in r]) == 5
