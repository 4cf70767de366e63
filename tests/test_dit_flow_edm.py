"""The DiT backbone, the flow-matching and EDM objectives with their ODE samplers, and post-hoc EMA: checked
against what they must compute exactly (in one process; the real-rank runs are in test_parallel and test_crash)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from safetensors.torch import save_file

from gen_dist import posthoc
from gen_dist.config import load_config
from gen_dist.family import family
from gen_dist.parallel import EMA, Replicated
from gen_dist.schema import ConfigError
from gen_dist.tasks.diffusion import TIME_SCALE, edm_scalings

SMOKE = CONFIGS / "smoke_diffusion.yaml"
TINY_DIT = ["diffusion.backbone=dit", "diffusion.dit_depth=2", "diffusion.dit_heads=2", "diffusion.dit_head_dim=8"]


def _task(*overrides: str):
    return family("diffusion").task(load_config(SMOKE, list(overrides)))


class _ExactDenoiser(torch.nn.Module):
    """The ideal network for a dataset of one image x0: flow's velocity (x_t - x0) / t, or EDM's F such that
    D(x, sigma) = x0, read back from the preconditioned inputs the task feeds it."""

    def __init__(self, x0: torch.Tensor, objective: str, sigma_data: float) -> None:
        super().__init__()
        self.x0, self.objective, self.sigma_data = x0, objective, sigma_data
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # where sampling finds the device
        self.config = SimpleNamespace(sample_size=x0.shape[-1], in_channels=x0.shape[0])

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> SimpleNamespace:
        t = t.double().view(-1, 1, 1, 1) / TIME_SCALE
        x = x.double()
        if self.objective == "flow":
            return SimpleNamespace(sample=(x - self.x0) / t)
        sigma = (4 * t).exp()
        c_skip, c_out, c_in, _ = edm_scalings(sigma, self.sigma_data)
        noisy = x / c_in
        return SimpleNamespace(sample=(self.x0 - c_skip * noisy) / c_out)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("objective", ["flow", "edm"])
def test_exact_denoiser_has_zero_loss_and_every_sampler_lands_on_its_image(objective: str, sampler: str) -> None:
    """The training target and the sampler's ODE are the same equations: the network that is exact for one image
    has zero loss at every noise level the objective draws, and integrating its ODE from noise ends on that
    image (Euler is exact on these straight paths, Heun too)."""
    task = _task(f"diffusion.objective={objective}", f"diffusion.sampler={sampler}", "diffusion.sample_steps=5",
                 "diffusion.num_classes=0", "diffusion.time_shift=3")
    x0 = torch.rand(1, 8, 8, dtype=torch.float64) * 1.6 - 0.8
    net = _ExactDenoiser(x0, objective, task.cfg.sigma_data)
    loss, stats = task.loss({"denoiser": net}, {"x": x0.expand(64, -1, -1, -1).float(), "label": None}, 0)
    assert loss.item() < 1e-8 and stats["mse"].item() < 1e-8
    out = task.sample(net, None, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.double(), x0.expand(3, -1, -1, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("objective", ["ddpm", "flow", "edm"])
def test_dit_learns_nothing_twice_its_labels_dropped_once_and_guided(objective: str) -> None:
    """The DiT's own label embeddings do not drop labels (each block has one, and they would drop differently);
    the null class is index num_classes, and guidance mixes the conditional and null-class outputs."""
    from diffusers.models.embeddings import LabelEmbedding

    task = _task(*TINY_DIT, f"diffusion.objective={objective}", "diffusion.num_classes=10",
                 "diffusion.label_dropout=0.1", "diffusion.guidance=3")
    net = task.modules["denoiser"]
    embeddings = [m for m in net.modules() if isinstance(m, LabelEmbedding)]
    assert len(embeddings) == 2 and all(m.dropout_prob == 0 and m.embedding_table.num_embeddings == 11
                                        for m in embeddings)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # adaLN-Zero starts at a zero output, which hides the labels
        x, t, labels = torch.randn(4, 1, 8, 8), torch.tensor(500.0), torch.tensor([1, 7, 3, 3])
        train_out = net.train()(x, t.expand(4), class_labels=labels).sample
        net.eval()
        cond = net(x, t.expand(4), class_labels=labels).sample
        uncond = net(x, t.expand(4), class_labels=torch.full_like(labels, 10)).sample
        guided = task._predict(net, x, t, labels)
    torch.testing.assert_close(train_out, cond)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(guided, uncond + 3 * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_dit_starts_at_zero_output_and_checkpointing_per_block_gives_equal_gradients() -> None:
    task = _task(*TINY_DIT, "diffusion.objective=flow")
    net = task.modules["denoiser"]
    with torch.no_grad():
        assert net(torch.randn(2, 1, 8, 8), torch.tensor([10.0, 900.0]), class_labels=torch.tensor([0, 1])
                   ).sample.abs().max() == 0
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = {"x": torch.rand(8, 1, 8, 8) * 2 - 1, "label": torch.arange(8)}

    def grads() -> dict[str, torch.Tensor]:
        net.zero_grad()
        torch.manual_seed(3)
        task.loss({"denoiser": net}, batch, 0)[0].backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    plain = grads()
    net.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)


def test_power_function_ema_and_its_reconstruction() -> None:
    for s in (0.03, 0.05, 0.1, 0.2, 0.28):
        assert posthoc.sigma_rel_of(posthoc.gamma_of(s)) == pytest.approx(s, rel=1e-9)
    # The update is the power-function average: weights seen up to step T with density ~ tau^gamma, whose mean
    # step is (gamma + 1) / (gamma + 2) T.
    steps, sigma = 3000, 0.1
    gamma = posthoc.gamma_of(sigma)
    value = torch.nn.Parameter(torch.zeros(()))
    module = torch.nn.Module()
    module.value = value
    ema = EMA(module, posthoc.power_beta(sigma), Replicated())
    for t in range(1, steps + 1):
        value.data.fill_(float(t))
        ema.update()
    assert ema.state_dict()["value"].item() == pytest.approx((gamma + 1) / (gamma + 2) * steps, rel=1e-3)
    # A tracked profile is its own reconstruction; an untracked length between them is reached closely.
    at = np.arange(1, 9, dtype=float) * 100
    snaps, gammas = np.concatenate([at, at]), np.array([posthoc.gamma_of(0.05)] * 8 + [gamma] * 8)
    x, err = posthoc.solve(snaps, gammas, 800, gamma)
    assert err < 1e-6 and x[-1] == pytest.approx(1, abs=1e-6) and np.abs(x[:-1]).max() < 1e-6
    assert posthoc.solve(snaps, gammas, 800, posthoc.gamma_of(0.07))[1] < posthoc.MAX_ERROR


def test_unreachable_posthoc_std_is_refused_naming_the_range(tmp_path) -> None:
    folder = tmp_path / posthoc.DIR
    folder.mkdir()
    for step in (100, 200, 300, 400):
        save_file({"p0.w": torch.zeros(2), "p1.w": torch.zeros(2)}, str(posthoc.snapshot_path(tmp_path, step)),
                  metadata={"step": str(step), "sigma_rels": json.dumps([0.05, 0.1]), "module": "denoiser",
                            "task_state": "{}"})
    assert posthoc.plan(tmp_path, 0.1)[2] < 1e-6
    with pytest.raises(ConfigError, match=r"cannot be reconstructed .* reach about \[0\.0"):
        posthoc.plan(tmp_path, 0.25)
    with pytest.raises(ConfigError, match="outside"):
        posthoc.plan(tmp_path, 0.4)
    with pytest.raises(ConfigError, match="no post-hoc EMA snapshots"):
        posthoc.plan(tmp_path / "elsewhere", 0.1)


@pytest.mark.parametrize("bad,match", [
    (["diffusion.objective=flow", "diffusion.sampler=dpm++"], "is a DDPM sampler; objective=flow"),
    (["diffusion.objective=edm", "diffusion.sampler=ddim"], "is a DDPM sampler; objective=edm"),
    (["diffusion.objective=flow", "diffusion.prediction=v_prediction"], "belong to objective=ddpm"),
    (["diffusion.objective=edm", "diffusion.snr_gamma=5"], "belong to objective=ddpm"),
    (["diffusion.guidance_interval=[0.1,0.5]"], "applies to objective=flow or edm"),
    (["diffusion.objective=flow", "diffusion.guidance_interval=[0.5,0.1]"], "guidance_interval must be"),
    (["diffusion.objective=edm", "diffusion.sigma_min=100"], "sigma_min and sigma_max"),
    (["diffusion.backbone=dit", "diffusion.patch_size=3"], "patch_size=3 does not divide data.resolution 8"),
    (["diffusion.backbone=vit"], "diffusion.backbone"),
    (["diffusion.objective=score"], "diffusion.objective"),
    (["train.posthoc_ema=[0.05,0.5]", "train.posthoc_every=10"], "train.posthoc_ema"),
    (["train.posthoc_ema=[0.05]"], "needs train.posthoc_every > 0"),
])
def test_bad_backbone_objective_and_posthoc_options_are_config_errors(bad: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(SMOKE, bad)


@pytest.mark.parametrize("objective", ["ddpm", "flow", "edm"])
def test_dit_trains_under_bf16_autocast_with_every_objective(objective: str) -> None:
    task = _task(*TINY_DIT, f"diffusion.objective={objective}", "diffusion.num_classes=10")
    net = task.modules["denoiser"]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    batch = {"x": torch.rand(8, 1, 8, 8) * 2 - 1, "label": torch.arange(8)}
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = task.loss({"denoiser": net}, batch, 0)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()
        opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = task.sample(net.eval(), task.sample_labels(2, torch.device("cpu")), 2, torch.Generator())
    assert torch.isfinite(images).all()


def test_a_run_resumes_with_other_sampling_settings_but_not_another_objective() -> None:
    from gen_dist.config import check_same_model

    saved = load_config(SMOKE, ["diffusion.objective=flow"])
    check_same_model(saved, load_config(SMOKE, ["diffusion.objective=flow", "diffusion.sampler=euler",
                                                "diffusion.sample_steps=50", "diffusion.guidance_interval=[0,0.5]"]))
    with pytest.raises(ConfigError, match="diffusion.objective: 'flow' -> 'edm'"):
        check_same_model(saved, load_config(SMOKE, ["diffusion.objective=edm"]))
