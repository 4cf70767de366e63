"""The VAE's likelihoods, KL schedule and free bits: the discretised likelihood is a distribution over the 256
pixel levels, the KL weight and the free-bits floor act as documented, bits/dim is the full-weight ELBO, each
likelihood trains through the CLI, and sampling depends only on the generator."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, run_cli, smoke_args, step_records, train_command
from safetensors.torch import load_file

from gen_dist.config import load_config
from gen_dist.schema import ConfigError
from gen_dist.tasks.vae import LIKELIHOODS, VAETask, discretised_log_prob, kl_penalty, kl_weight

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1
DISCRETISED = ("logistic", "gaussian")


def _task(*overrides: str) -> VAETask:
    return VAETask(load_config(CONFIGS / "smoke_vae.yaml", list(overrides)))


def _cdf(kind: str, t: float) -> float:
    return 1 / (1 + math.exp(-t)) if kind == "logistic" else 0.5 * (1 + math.erf(t / math.sqrt(2)))


@pytest.mark.parametrize("kind", DISCRETISED)
@pytest.mark.parametrize(("mean", "log_scale"), [(0.0, 0.0), (0.3, -3.0), (-0.99, -6.0), (0.9, -7.0), (2.0, 1.0),
                                                 (-5.0, -7.0)])
def test_discretised_likelihood_sums_to_one_over_the_levels(kind: str, mean: float, log_scale: float) -> None:
    logp = discretised_log_prob(LEVELS.float(), torch.full((256,), mean), torch.full((256,), log_scale), kind)
    assert torch.isfinite(logp).all()
    assert logp.double().exp().sum().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("kind", DISCRETISED)
def test_discretised_likelihood_matches_a_hand_computation(kind: str) -> None:
    mean, log_scale, s = 0.1, -2.0, math.exp(-2.0)
    x = LEVELS[140].item()
    half = 1 / 255
    bin_mass = _cdf(kind, (x + half - mean) / s) - _cdf(kind, (x - half - mean) / s)
    got = discretised_log_prob(torch.tensor([x, -1.0, 1.0]), torch.full((3,), mean), torch.full((3,), log_scale),
                               kind)
    assert got[0].item() == pytest.approx(math.log(bin_mass), rel=1e-4)
    # The edge levels take the tails.
    assert got[1].item() == pytest.approx(math.log(_cdf(kind, (-1 + half - mean) / s)), rel=1e-4)
    assert got[2].item() == pytest.approx(math.log(1 - _cdf(kind, (1 - half - mean) / s)), rel=1e-4)


@pytest.mark.parametrize("kind", DISCRETISED)
def test_discretised_likelihood_gradients_are_finite_far_in_the_tails(kind: str) -> None:
    mean = torch.tensor([-5.0, 0.0, 5.0, 0.99]).repeat_interleave(256).requires_grad_()
    log_scale = torch.full_like(mean, -7.0).requires_grad_()
    discretised_log_prob(LEVELS.float().repeat(4), mean, log_scale, kind).sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()


def test_kl_warmup_ramps_beta_linearly_from_zero() -> None:
    assert kl_weight(2.0, 0, 100) == 0.0
    assert kl_weight(2.0, 50, 100) == pytest.approx(1.0)
    assert kl_weight(2.0, 100, 100) == 2.0 and kl_weight(2.0, 5000, 100) == 2.0
    assert kl_weight(2.0, 0, 0) == 2.0


def test_free_bits_stop_the_gradient_only_below_the_floor() -> None:
    kl_dims = torch.tensor([[0.1, 0.4, 2.0], [0.3, 0.8, 1.0]], requires_grad=True)  # batch means 0.2, 0.6, 1.5
    penalty = kl_penalty(kl_dims, free_bits=0.5)
    assert penalty.item() == pytest.approx(0.5 + 0.6 + 1.5)
    penalty.backward()
    assert kl_dims.grad[:, 0].abs().sum() == 0
    assert torch.allclose(kl_dims.grad[:, 1:], torch.full((2, 2), 0.5))
    assert kl_penalty(kl_dims.detach(), free_bits=0.0).item() == pytest.approx(0.2 + 0.6 + 1.5)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_loss_weights_the_kl_by_the_schedule_and_bits_per_dim_by_one(likelihood: str) -> None:
    task = _task(f"vae.likelihood={likelihood}", "vae.kl_warmup_steps=10", "vae.beta=2.0")
    net = task.modules["vae"]
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    for step, beta in ((0, 0.0), (5, 1.0), (10, 2.0)):
        torch.manual_seed(0)
        loss, stats = task.loss({"vae": net}, {"x": x}, step)
        assert stats["beta"].item() == beta
        assert loss.item() == pytest.approx((stats["recon"] + beta * stats["kl"]).item(), rel=1e-5)
        honest = (stats["recon"] + stats["kl"]).item() / (64 * math.log(2))
        assert stats["bits_per_dim"].item() == pytest.approx(honest, rel=1e-5)


def test_free_bits_leave_a_collapsed_latent_unpenalised() -> None:
    """With every dimension's KL under the floor the KL term is a constant: no gradient reaches the posterior
    from it, and the loss is the reconstruction plus the floor."""
    task = _task("vae.likelihood=logistic", "vae.free_bits=100.0")
    net = task.modules["vae"]
    torch.manual_seed(0)
    loss, stats = task.loss({"vae": net}, {"x": torch.rand(4, 1, 8, 8) * 2 - 1}, 50)
    assert loss.item() == pytest.approx(stats["recon"].item() + 100.0 * net.latent_dim, rel=1e-5)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_sampling_is_deterministic_in_the_generator(likelihood: str) -> None:
    task = _task(f"vae.likelihood={likelihood}", "vae.res_blocks=1")
    net = task.modules["vae"].eval()
    a, b, c = (task.sample(net, None, 6, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert a.shape == (6, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


@pytest.mark.parametrize(("override", "needle"), [
    ("vae.likelihood=poisson", "'vae.likelihood' must be one of bernoulli, logistic, gaussian"),
    ("vae.free_bits=-0.5", "'vae.free_bits' must be >= 0"),
    ("vae.kl_warmup_steps=-1", "'vae.kl_warmup_steps' must be >= 0"),
    ("vae.res_blocks=-1", "'vae.res_blocks' must be >= 0"),
    ("vae.channels=[12, 16]", "multiples of 8"),
])
def test_bad_vae_settings_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(CONFIGS / "smoke_vae.yaml", [override])


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_each_likelihood_trains_and_logs_bits_per_dim(likelihood: str, tmp_path: Path, digits: Path) -> None:
    """The logistic run is on 2 ranks with the fitted prior, whose statistics reach the checkpoint."""
    run_dir, fitted = tmp_path / likelihood, likelihood == "logistic"
    extra = ["vae.prior=fitted"] if fitted else []
    run_cli(*train_command(2 if fitted else 1, *smoke_args(
        "vae", run_dir, digits, f"vae.likelihood={likelihood}", "vae.kl_warmup_steps=4", "vae.free_bits=0.1",
        "vae.res_blocks=1", *extra)))
    if fitted:
        ema = load_file(str(sorted((run_dir / "checkpoints").iterdir())[-1] / "ema.safetensors"))
        assert ema["agg_mean"].abs().sum() > 0 and not torch.equal(ema["agg_moment"], torch.eye(4))
    logged = step_records(run_dir)
    assert [r["step"] for r in logged] == [2, 4, 6]
    for key in ("elbo/loss", "elbo/recon", "elbo/kl", "elbo/bits_per_dim"):
        assert all(math.isfinite(r[key]) for r in logged), key
    assert all(r["elbo/bits_per_dim"] > 0 for r in logged)
    if likelihood != "bernoulli":  # a code length of 8-bit pixels: under 8 bits once it has learnt anything
        assert logged[-1]["elbo/bits_per_dim"] < 8
    assert logged[-1]["elbo/beta"] == 1.0
    assert (run_dir / "samples" / "step_00000006.png").exists()


def test_sample_temperature_scales_the_prior_draws() -> None:
    task = _task("vae.sample_temperature=0.5")
    net = task.modules["vae"].eval()
    got = task.sample(net, None, 4, torch.Generator().manual_seed(3))
    z = torch.randn((4, net.latent_dim), generator=torch.Generator().manual_seed(3)) * 0.5
    assert torch.allclose(got, task.decode_mean(net.decode(z)).clamp(-1, 1))
    with pytest.raises(ConfigError, match="'vae.sample_temperature' must be > 0"):
        load_config(CONFIGS / "smoke_vae.yaml", ["vae.sample_temperature=0"])


def test_fitted_prior_tracks_the_aggregate_posterior_and_samples_from_it() -> None:
    """prior=fitted: after_step folds the step's posterior moments (summed over ranks) into the model's buffers,
    and samples are drawn from the Gaussian with those moments."""
    task = _task("vae.prior=fitted", "vae.prior_decay=0.5")
    net = task.modules["vae"]
    torch.manual_seed(0)
    x = torch.rand(32, 1, 8, 8) * 2 - 1
    task.loss({"vae": net}, {"x": x, "micro": 0}, 0)
    task.after_step({"vae": net}, lambda t: t.mul_(2), 0)  # two ranks with the same batch: the same means
    with torch.no_grad():
        _, mu, logvar = net(x)
    moment = (mu.T @ mu + torch.diag(logvar.exp().sum(0))) / len(mu)
    torch.testing.assert_close(net.agg_mean, 0.5 * mu.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(net.agg_moment, 0.5 * torch.eye(len(mu[0])) + 0.5 * moment, atol=1e-5, rtol=1e-4)
    mean, cov = net.agg_mean.double(), net.agg_moment.double() - torch.outer(net.agg_mean, net.agg_mean).double()
    z = task._prior_draws(net, 20000, torch.Generator().manual_seed(1)).double()
    assert (z.mean(0) - mean).abs().max() < 0.05
    assert (torch.cov(z.T) - cov).abs().max() < 0.05
    assert not hasattr(_task().modules["vae"], "agg_mean")  # the standard prior adds no state
    with pytest.raises(ConfigError, match="prior_decay"):
        _task("vae.prior=fitted", "vae.prior_decay=1")
