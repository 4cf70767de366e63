"""The GAN's sample-quality features: class-conditional G and D, differentiable augmentation with its adaptive
probability (and its exact resume), and per-network optimizer settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, run_cli, smoke_args, step_records
from safetensors.torch import load_file

from gen_dist import augment, checkpoint
from gen_dist.config import load_config
from gen_dist.engine import Trainer
from gen_dist.schema import ConfigError
from gen_dist.tasks.dcgan import ClassNorm, minibatch_std
from gen_dist.tasks.gan import GANTask


def _task(*overrides: str) -> GANTask:
    torch.manual_seed(0)
    return GANTask(load_config(CONFIGS / "smoke_gan.yaml", list(overrides)))


def _images(n: int = 16) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(n, 1, 8, 8) * 2 - 1


# ------------------------------------------------------------------------------------------ augmentation


@pytest.mark.parametrize("op", [*augment.OPS, *augment.AFFINE])
def test_augmentation_is_identity_at_p0_changes_images_at_p1_and_is_differentiable(op: str) -> None:
    x = _images().requires_grad_(True)
    assert torch.equal(augment.augment(x, (op,), 0.0), x)
    torch.manual_seed(2)
    y = augment.augment(x, (op,), 1.0)
    assert y.shape == x.shape
    # The flip and the quarter turns draw the identity too (half and a quarter of the time), as ADA does.
    assert (y - x).abs().flatten(1).amax(1).gt(1e-3).float().mean() > 0.3, "most samples must change"
    # R1 differentiates through the augmentation twice: d/dx of a function of the gradient.
    (grad,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (grad2,) = torch.autograd.grad(grad.square().sum(), x)
    assert grad.abs().sum() > 0 and torch.isfinite(grad2).all()


def test_augmentation_draws_follow_the_global_seed_and_p_chooses_samples() -> None:
    x, ops = _images(64), ("translation", "cutout", "color")
    torch.manual_seed(3)
    a = augment.augment(x, ops, 0.5)
    torch.manual_seed(3)
    b = augment.augment(x, ops, 0.5)
    torch.manual_seed(4)
    c = augment.augment(x, ops, 0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    untouched = (a == x).flatten(1).all(1).float().mean().item()
    assert 0.02 < untouched < 0.4, untouched  # (1 - 0.5)^3 = 1/8 of the samples expected untouched


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`x` moved down dy and right dx pixels, zero-filled."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_translation_shifts_whole_pixels_with_zero_fill() -> None:
    x = torch.arange(1.0, 65.0).view(1, 1, 8, 8).expand(64, 1, 8, 8)
    torch.manual_seed(5)
    y = augment.translation(x)
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # 8 px x 1/8 = 1 px each way
    seen = {next(s for s in shifts if torch.equal(img, _shifted(x[0], *s))) for img in y}
    assert len(seen) >= 7


def test_bad_augmentation_settings_are_config_errors() -> None:
    bad = [("gan.augment=translation,blur", "unknown augmentation 'blur'"),
           ("gan.augment_p=1.5", "gan.augment_p=1.5 must be in [0, 1]"),
           ("gan.ada_target=1", "gan.ada_target=1.0 must be in [0, 1)"),
           ("gan.d_betas=[0.5]", "gan.d_betas=[0.5] must be [] (optim.betas) or two values in [0, 1)"),
           ("gan.g_lr=-1", "gan.g_lr=-1.0 must be >= 0")]
    for override, message in bad:
        with pytest.raises(ConfigError) as err:
            load_config(CONFIGS / "smoke_gan.yaml", [override])
        assert message in str(err.value), (override, str(err.value))
    with pytest.raises(ConfigError, match="gan.augment, which is empty"):
        load_config(CONFIGS / "smoke_gan.yaml", ["gan.augment=", "gan.ada_target=0.6"])
    with pytest.raises(ConfigError, match="gan.ada_interval"):
        load_config(CONFIGS / "smoke_gan.yaml", ["gan.ada_interval=0"])


# ------------------------------------------------------------------------------------------ ADA


TRAINING = {"micro": 0}  # what marks a training micro-batch


def _feed(task: GANTask, sign: float, steps: int, reduce=lambda t: t) -> list[float]:
    """Steps of a D that calls every real image `sign`; the probability after each."""
    ps = []
    for step in range(steps):
        task.aug.observe(TRAINING, torch.full((16,), sign))
        task.after_step({}, reduce, step)
        ps.append(task.aug.p.item())
    return ps


def test_ada_probability_rises_when_d_overfits_falls_when_not_and_stays_in_0_1() -> None:
    task = _task("gan.ada_interval=2", "gan.ada_kimg=0.128")  # 2 steps x 16 images move p by 0.25
    assert task.aug.p.item() == 0
    task.aug.observe({}, torch.full((4,), -1.0))  # the FLOP count's batch (no `micro`) is not counted
    up = _feed(task, 1.0, 10)
    assert up[:6] == pytest.approx([0, 0.25, 0.25, 0.5, 0.5, 0.75]) and up[-1] == 1.0
    down = _feed(task, -1.0, 10)
    assert down[1] == pytest.approx(0.75) and down[-1] == 0.0
    # r_t = 0.5 (3 of 4 reals called real) is below the target 0.6: p falls; at 0.75 (7 of 8) it rises.
    task.aug.p = torch.tensor(0.5)
    for signs, expected in (([1.0, 1.0, 1.0, -1.0] * 2, 0.5 - 0.125), ([1.0] * 7 + [-1.0], 0.5)):
        for step in range(2):
            task.aug.observe(TRAINING, torch.tensor(signs))
            task.after_step({}, lambda t: t, step)
        assert task.aug.p.item() == pytest.approx(expected)


def test_ada_sums_over_ranks_through_reduce() -> None:
    """Another rank whose D calls its reals fake outvotes this one: the step sees r_t < target on every rank."""
    task = _task("gan.ada_interval=1", "gan.ada_kimg=0.128")
    task.aug.p = torch.tensor(0.5)

    def two_ranks(t: torch.Tensor) -> torch.Tensor:
        other = torch.tensor([-16.0, 16.0]) * 3  # 48 images, all called fake
        return t.add_(other)

    _feed(task, 1.0, 1, two_ranks)
    assert task.aug.p.item() == pytest.approx(0.5 - 64 / 128)


def test_ada_state_and_weights_resume_exactly(tmp_path: Path, digits: Path) -> None:
    """7 steps straight == 3 steps, stop, resume for 4 more, with p moving every other step: the checkpoint
    of step 3 holds half an interval of sums, and both runs end with the same p, sums and weights."""
    common = ["gan.ada_interval=2", "track.backends=[jsonl]"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train", *smoke_args("gan", straight, digits), *common, "train.steps=7", "train.ckpt_every=100")
    run_cli("train", *smoke_args("gan", resumed, digits), *common, "train.steps=3")
    mid = checkpoint.describe(checkpoint.latest(resumed)).state["task"]["augment"]
    assert mid["sums"][1] == 16 and 0 < mid["p"] < 1
    run_cli("train", *smoke_args("gan", resumed, digits), *common, "train.steps=7")
    ends = [checkpoint.latest(d) for d in (straight, resumed)]
    a, b = (checkpoint.describe(e).state["task"]["augment"] for e in ends)
    assert a == b and a["p"] > mid["p"]
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        wa, wb = (load_file(str(e / name)) for e in ends)
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}:{k}"
    logged = [r["D/augment_p"] for r in step_records(straight)]
    assert logged == sorted(logged) and logged[-1] > 0, "p is logged and rises while the small D overfits"


# ------------------------------------------------------------------------------------------ TTUR


def test_each_network_gets_its_own_learning_rate_and_betas(tmp_path: Path, digits: Path) -> None:
    cfg = load_config(CONFIGS / "smoke_gan.yaml", [f"run_dir={tmp_path / 'run'}", f"data.path={digits}",
                                                   "track.backends=[jsonl]", "gan.d_lr=2e-3", "gan.d_betas=[0.0, 0.9]",
                                                   "gan.g_betas=[0.5, 0.99]"])
    trainer = Trainer(cfg)
    d, g = (trainer.trained[n].opt.param_groups[0] for n in ("D", "G"))
    assert (d["lr"], tuple(d["betas"])) == (2e-3, (0.0, 0.9))  # gan.d_lr, gan.d_betas
    assert (g["lr"], tuple(g["betas"])) == (1e-3, (0.5, 0.99))  # optim.lr, gan.g_betas
    assert trainer.cfg.optim.betas == [0.9, 0.999]
    trainer.train()
    last = step_records(tmp_path / "run")[-1]
    assert last["lr/D"] == 2e-3 and last["lr/G"] == 1e-3


# ------------------------------------------------------------------------------------------ conditioning


def test_conditional_generator_varies_with_class_and_with_z_within_a_class() -> None:
    task = _task()
    g = task.modules["G"]
    norms = [m for m in g.modules() if isinstance(m, ClassNorm)]
    assert len(norms) == 1 + len(g.blocks), "the class modulates the norm at every level"
    z = torch.randn(1, task.z_dim).expand(10, -1)
    labels = torch.arange(10)
    torch.testing.assert_close(norms[0](torch.randn(10, 32, 2, 2), labels).std(), torch.tensor(1.0), atol=0.1,
                               rtol=0)  # identity at init: a normalised map
    for norm in norms:
        torch.nn.init.normal_(norm.embed.weight, std=0.5)
    by_class = g(z, labels)
    assert min((by_class[i] - by_class[j]).abs().max() for i in range(10) for j in range(i)) > 1e-3
    # The class-conditional norms alone tell the classes apart (the embedding concatenated to z is the same).
    g.embed.weight.data[:] = g.embed.weight.data[:1]
    norm_only = g(z, labels)
    assert min((norm_only[i] - norm_only[j]).abs().max() for i in range(10) for j in range(i)) > 1e-3
    one_class = g(torch.randn(8, task.z_dim), torch.full((8,), 3))
    assert min((one_class[i] - one_class[j]).abs().max() for i in range(8) for j in range(i)) > 1e-3


def test_minibatch_std_groups_are_fixed_by_the_global_batch_and_d_projects_the_class() -> None:
    h = torch.randn(4, 4, 2, 2).repeat_interleave(4, 0)  # 4 groups of 4 identical samples
    std = minibatch_std(h, 4)[:, -1]
    assert std.max() < 1e-3, "identical samples within each group: no variety"
    noisy = h + 0.1 * torch.randn(h.shape, generator=torch.Generator().manual_seed(0))
    whole = minibatch_std(noisy, 4)[:, -1]
    assert whole.min() > 0.04  # ~0.08 expected
    # Two micro-batches of 8 (two ranks, or accumulation) give each sample the value the batch of 16 gives it.
    torch.testing.assert_close(torch.cat([minibatch_std(part, 4)[:, -1] for part in noisy.chunk(2)]), whole)
    task = _task()
    d = task.modules["D"]
    torch.nn.init.normal_(d.embed.weight)
    x = _images(8)
    feats = d.net(x).mean(dim=(2, 3))
    a, b = d(x, torch.zeros(8, dtype=torch.long)), d(x, torch.ones(8, dtype=torch.long))
    # The std channel does not depend on the labels: the logits differ by the projection,
    # <embed(y), mean-pooled features>.
    torch.testing.assert_close(a - b, feats @ (d.embed.weight[0] - d.embed.weight[1]), rtol=1e-4, atol=1e-5)


def test_fakes_take_the_real_batch_classes() -> None:
    task = _task()
    batch = {"x": _images(8), "label": torch.arange(8) % 3}
    _, labels = task._fake_inputs(batch)
    assert torch.equal(labels, batch["label"])


def test_shipped_fashion_mnist_config_is_conditional_with_ada() -> None:
    cfg = load_config(CONFIGS / "gan_fashion_mnist.yaml", [])
    assert cfg.gan.num_classes == 10 and cfg.gan.ada_target > 0 and cfg.gan.augment
    assert json.loads(json.dumps(GANTask(cfg).state_dict())) == {"augment": {"p": 0.0, "sums": [0.0, 0.0]}}
