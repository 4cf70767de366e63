"""Diffusion options users reach for: epsilon / v / x0 objectives with Min-SNR weighting, label dropout and
classifier-free guidance, diffusers' samplers, `gen-dist sample --class`, and `train.init_from`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import CONFIGS, events, run_cli, smoke_args
from safetensors.torch import load_file

from gen_dist.config import load_config
from gen_dist.family import family
from gen_dist.schema import ConfigError
from gen_dist.tasks.diffusion import SAMPLERS

SMOKE = CONFIGS / "smoke_diffusion.yaml"


def _task(*overrides: str):
    cfg = load_config(SMOKE, ["diffusion.num_classes=10", *overrides])
    task = family("diffusion").task(cfg)
    task.modules["denoiser"].eval()
    return task


class _Counting(torch.nn.Module):
    """Wraps the UNet and counts network passes (one per call, whatever the batch)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls, self.config = net, 0, net.config

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_every_sampler_and_objective_samples_deterministically(sampler: str, prediction: str) -> None:
    if sampler == "euler_a" and prediction == "sample":
        with pytest.raises(ConfigError, match="euler_a"):
            _task(f"diffusion.sampler={sampler}", f"diffusion.prediction={prediction}")
        return
    task = _task(f"diffusion.sampler={sampler}", f"diffusion.prediction={prediction}", "diffusion.sample_steps=4",
                 "diffusion.guidance=2")
    net = _Counting(task.modules["denoiser"])
    labels = task.sample_labels(3, torch.device("cpu"))
    a = task.sample(net, labels, 3, torch.Generator().manual_seed(1))
    passes = net.calls
    b = task.sample(net, labels, 3, torch.Generator().manual_seed(1))
    c = task.sample(net, labels, 3, torch.Generator().manual_seed(2))
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all() and a.abs().max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Guidance is one doubled batch per step; Heun evaluates twice per step but once at the last.
    assert passes == (2 * 4 - 1 if sampler == "heun" else 4)


def test_guidance_combines_conditional_and_null_class_predictions() -> None:
    task = _task("diffusion.guidance=3")
    net = task.modules["denoiser"]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # a zero-initialised output layer would hide the labels
        x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor(500), torch.tensor([1, 7])
        cond = net(x, t, class_labels=labels).sample
        uncond = net(x, t, class_labels=torch.full_like(labels, 10)).sample
        guided = task._predict(net, x, t, labels)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(guided, uncond + 3 * (cond - uncond), atol=1e-5, rtol=1e-5)
    # The null class is an embedding of its own, present only when labels are dropped in training.
    assert net.class_embedding.num_embeddings == 11
    assert _task("diffusion.label_dropout=0").modules["denoiser"].class_embedding.num_embeddings == 10


def test_label_dropout_replaces_labels_by_the_null_class() -> None:
    task = _task("diffusion.label_dropout=0.25")
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20000,))
    out = task._train_condition({}, {"label": labels})
    dropped = out == 10
    assert abs(dropped.float().mean().item() - 0.25) < 0.02
    assert torch.equal(out[~dropped], labels[~dropped])
    assert torch.equal(_task("diffusion.label_dropout=0")._train_condition({}, {"label": labels}), labels)


def test_targets_and_min_snr_weights_follow_the_published_forms() -> None:
    t = torch.tensor([10, 500, 990])
    x, noise = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    for prediction in ("epsilon", "v_prediction", "sample"):
        task = _task(f"diffusion.prediction={prediction}", "diffusion.snr_gamma=5")
        abar = task.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        expected = {"epsilon": noise, "sample": x,
                    "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * x}[prediction]
        torch.testing.assert_close(task._target(x, noise, t), expected, atol=1e-5, rtol=1e-5)
        snr = abar.flatten() / (1 - abar.flatten())
        weight = {"epsilon": snr.clamp(max=5) / snr, "v_prediction": snr.clamp(max=5) / (snr + 1),
                  "sample": snr.clamp(max=5)}[prediction]
        torch.testing.assert_close(task._snr_weight(t), weight.float(), atol=1e-5, rtol=1e-4)
    # Low-noise steps (high SNR) are weighted down for epsilon; noisy ones keep weight 1.
    w = _task("diffusion.snr_gamma=5")._snr_weight(t)
    assert w[0] < 0.1 and math.isclose(w[2].item(), 1.0)


@pytest.mark.parametrize("bad,match", [
    (["diffusion.guidance=2", "diffusion.label_dropout=0"], "needs a model trained with classifier-free"),
    (["diffusion.label_dropout=1"], "label_dropout"),
    (["diffusion.sampler=plms"], "diffusion.sampler"),
    (["diffusion.prediction=x0"], "diffusion.prediction"),
    (["diffusion.snr_gamma=-1"], "snr_gamma"),
])
def test_bad_diffusion_options_are_config_errors(bad: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(SMOKE, ["diffusion.num_classes=10", *bad])


def test_guided_run_samples_by_class_and_initialises_a_new_run(tmp_path, digits) -> None:
    """A v-prediction, Min-SNR, guided run trains; `gen-dist sample --class` draws one class with another
    sampler; a second run started from it with lr 0 keeps exactly the first run's EMA weights."""
    first, second = tmp_path / "first", tmp_path / "second"
    run_cli("train", *smoke_args("diffusion", first, digits, "diffusion.num_classes=10",
                                 "diffusion.prediction=v_prediction", "diffusion.snr_gamma=5", "diffusion.guidance=2",
                                 "diffusion.sampler=euler"))
    out = tmp_path / "sevens.npz"
    run_cli("sample", str(first), "--n", "6", "--class", "7", "--sampler", "heun", "--steps", "3",
            "--guidance", "1.5", "--out", str(out))
    images = np.load(out)["images"]
    assert images.shape == (6, 8, 8, 1) and len({im.tobytes() for im in images}) == 6
    bad = run_cli("sample", str(first), "--class", "10", "--out", str(tmp_path / "x.png"), check=False)
    assert bad.returncode != 0 and "--class 10: the model has 10 classes" in bad.stderr

    proc = run_cli("train", *smoke_args("diffusion", second, digits, "diffusion.num_classes=10",
                                        "diffusion.prediction=v_prediction", "optim.lr=0", "train.steps=2",
                                        "train.ema_decay=0", f"train.init_from={first}"))
    assert "denoiser: " in proc.stdout and "tensors loaded" in proc.stdout
    (event,) = events(second, "init_from")
    assert event["modules"]["denoiser"]["missing"] == 0
    ema = load_file(str(sorted((first / "checkpoints").iterdir())[-1] / "ema.safetensors"))
    final = load_file(str(sorted((second / "checkpoints").iterdir())[-1] / "model.safetensors"))
    assert ema.keys() == final.keys() and all(torch.equal(ema[k], final[k]) for k in ema)

    missing = run_cli("train", *smoke_args("diffusion", tmp_path / "third", digits,
                                           f"train.init_from={tmp_path / 'nowhere'}"), check=False)
    assert missing.returncode != 0 and "train.init_from" in missing.stderr and "does not exist" in missing.stderr
