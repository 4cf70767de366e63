"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion models", sec. 3):
training keeps power-function EMAs of the sampled module (train.posthoc_ema, each a relative std sigma_rel) and
writes them in half precision every train.posthoc_every steps; afterwards the EMA of any length is approximated
as the linear combination of the snapshots whose averaging profile is closest (least squares) to the wanted
one's. Implemented from the paper's equations.

A power-function EMA with exponent gamma averages the weights seen up to step t with density
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]; its update after the t-th step is
ema <- beta ema + (1 - beta) theta with beta = (1 - 1/t)^(gamma + 1). Its width relative to t is
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). Under ZeRO-3 and FSDP each rank averages its own
part of the weights (parallel.EMA); a snapshot is consolidated only when it is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gen_dist import checkpoint, parallel
from gen_dist.artifact import run_config_file, save_atomic, write_weights_file
from gen_dist.schema import MAX_SIGMA_REL, ConfigError

DIR = "posthoc"
"""The run directory's folder of post-hoc EMA snapshots (and of reconstructions)."""
MAX_ERROR = 0.05
"""A reconstruction whose profile is further than this (relative L2) from the wanted one is refused."""


def gamma_of(sigma_rel: float) -> float:
    """The exponent whose power-function EMA has relative std `sigma_rel` (the largest real root of the cubic
    sigma^2 (g + 2)^2 (g + 3) = g + 1)."""
    inv = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def sigma_rel_of(gamma: float) -> float:
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_beta(sigma_rel: float) -> Callable[[int], float]:
    """The decay of the update after n earlier ones (the (n+1)-th step), for parallel.EMA."""
    g = gamma_of(sigma_rel)
    return lambda n: (1 - 1 / (n + 1)) ** (g + 1)


class Profiles:
    """The tracked profiles of a run: one parallel.EMA each, in the strategy's weight layout."""

    def __init__(self, module: nn.Module, sigma_rels: list[float], layout: parallel.WeightLayout) -> None:
        self.sigma_rels = list(sigma_rels)
        self.emas = [parallel.EMA(module, power_beta(s), layout) for s in self.sigma_rels]

    def update(self) -> None:
        for e in self.emas:
            e.update()

    def files(self) -> dict[str, dict[str, torch.Tensor]]:
        """Consolidated fp32 profiles for a checkpoint (collectives under sharding)."""
        return {checkpoint_file(i): e.state_dict() for i, e in enumerate(self.emas)}

    def meta_state(self) -> list[int]:
        return [e.updates for e in self.emas]

    def load(self, ckpt: Path, updates: list[int]) -> None:
        from safetensors.torch import load_file

        if len(updates) != len(self.emas):
            raise ConfigError(f"{ckpt} tracks {len(updates)} post-hoc EMA profiles, train.posthoc_ema names "
                              f"{len(self.emas)}")
        for i, (e, n) in enumerate(zip(self.emas, updates, strict=True)):
            e.load_state_dict(load_file(str(ckpt / checkpoint_file(i))), n)

    def write(self, path: Path, step: int, module: str, task_state: dict, main: bool) -> None:
        """A half-precision snapshot of every profile (consolidated on every rank, written by the main one)."""
        tensors = {}
        for i, e in enumerate(self.emas):
            tensors.update({f"p{i}.{k}": (v.half() if v.is_floating_point() else v).contiguous()
                            for k, v in e.state_dict().items()})
        if main:
            save_atomic(path, tensors, {"step": str(step), "sigma_rels": json.dumps(self.sigma_rels),
                                        "module": module, "task_state": json.dumps(task_state)})


def checkpoint_file(i: int) -> str:
    return f"posthoc_{i}.safetensors"


def snapshot_path(run_dir: Path, step: int) -> Path:
    return run_dir / DIR / f"{checkpoint.step_name(step)}.safetensors"


# ---------------------------------------------------------------------------------------------- reconstruction


def _inner(ta: np.ndarray, ga: np.ndarray, tb: np.ndarray, gb: np.ndarray) -> np.ndarray:
    """<p_a, p_b> of power-function profiles (t, gamma), broadcast: the integral of their product over
    [0, min(ta, tb)]."""
    low = np.log(np.minimum(ta, tb))
    # (ga + 1)(gb + 1) T^(ga + gb + 1) / ((ga + gb + 1) ta^(ga + 1) tb^(gb + 1)) with T = min(ta, tb), in logs:
    # long profiles have exponents in the thousands.
    scale = (ga + 1) * (low - np.log(ta)) + (gb + 1) * (low - np.log(tb)) - low
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * np.exp(scale)


def solve(steps: np.ndarray, gammas: np.ndarray, t: float, gamma: float) -> tuple[np.ndarray, float]:
    """Weights x of the snapshots (steps, gammas) whose combined profile is closest to (t, gamma), and the
    relative L2 distance of the two profiles."""
    a = _inner(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    b = _inner(steps, gammas, np.float64(t), np.float64(gamma))
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    own = float(_inner(np.float64(t), np.float64(gamma), np.float64(t), np.float64(gamma)))
    err2 = max(0.0, float(x @ a @ x - 2 * x @ b) + own)
    return x, float(np.sqrt(err2 / own))


def snapshots(run_dir: Path) -> list[tuple[int, Path, list[float]]]:
    """(step, file, sigma_rels) of a run's post-hoc EMA snapshots, oldest first."""
    from safetensors import safe_open

    out = []
    for f in sorted((run_dir / DIR).glob("step_*.safetensors")):
        with safe_open(str(f), "pt") as h:
            meta = h.metadata()
        out.append((int(meta["step"]), f, json.loads(meta["sigma_rels"])))
    if not out:
        raise ConfigError(f"{run_dir} has no post-hoc EMA snapshots in {DIR}/ (train.posthoc_ema and "
                          f"train.posthoc_every)")
    return out


def plan(run_dir: Path, sigma_rel: float, step: int = 0) -> tuple[list[tuple[Path, int, float]], int, float]:
    """How to reconstruct the EMA with `sigma_rel` at `step` (0 = the newest snapshot): [(file, profile index,
    weight)], the step, and the profile's relative error. ConfigError when the snapshots cannot give it."""
    found = snapshots(run_dir)
    step = step or found[-1][0]
    used = [(s, f, i, gamma_of(r)) for s, f, rels in found if s <= step for i, r in enumerate(rels)]
    if not used:
        raise ConfigError(f"{run_dir} has no post-hoc EMA snapshot at or before step {step}")
    if not 0 < sigma_rel <= MAX_SIGMA_REL:
        raise ConfigError(f"post-hoc EMA std {sigma_rel} is outside (0, {MAX_SIGMA_REL}]: a power-function EMA "
                          f"cannot be that long")
    x, err = solve(np.array([u[0] for u in used], float), np.array([u[3] for u in used]), step, gamma_of(sigma_rel))
    if err > MAX_ERROR:
        lo, hi = reachable(used, step)
        raise ConfigError(f"post-hoc EMA std {sigma_rel} cannot be reconstructed from the snapshots of {run_dir} "
                          f"at step {step} (profile error {err:.1%} > {MAX_ERROR:.0%}); they reach about "
                          f"[{lo:.3f}, {hi:.3f}]")
    return [(f, i, float(w)) for (_, f, i, _), w in zip(used, x, strict=True)], step, err


def reachable(used: list[tuple[int, Path, int, float]], step: int) -> tuple[float, float]:
    """The range of relative stds the snapshots reconstruct within MAX_ERROR (scanned)."""
    steps, gammas = np.array([u[0] for u in used], float), np.array([u[3] for u in used])
    ok = [s for s in np.linspace(0.005, MAX_SIGMA_REL, 276)
          if solve(steps, gammas, step, gamma_of(s))[1] <= MAX_ERROR]
    return (min(ok), max(ok)) if ok else (float("nan"), float("nan"))


def reconstruct(run_dir: Path, sigma_rel: float, step: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """The EMA with `sigma_rel` at `step` (fp32 weights), and what it was made of."""
    from safetensors import safe_open

    parts, step, err = plan(run_dir, sigma_rel, step)
    out: dict[str, torch.Tensor] = {}
    for f, i, w in parts:
        with safe_open(str(f), "pt") as h:
            prefix = f"p{i}."
            for key in h.keys():  # noqa: SIM118 (safe_open has no iterator)
                if key.startswith(prefix):
                    v = h.get_tensor(key)
                    name = key[len(prefix):]
                    if v.is_floating_point():
                        out[name] = out.get(name, 0) + w * v.double()
                    else:  # integer buffers: the newest snapshot's
                        out[name] = v
            meta = h.metadata()
    weights = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
    return weights, {"sigma_rel": sigma_rel, "step": step, "profile_error": err, "module": meta["module"],
                     "task_state": json.loads(meta["task_state"]), "snapshots": len({f for f, _, _ in parts})}


def output_path(run_dir: Path, sigma_rel: float, step: int) -> Path:
    return run_dir / DIR / f"ema_{sigma_rel:.3f}_{checkpoint.step_name(step)}.safetensors"


def export(run_dir: Path, sigma_rel: float, out: Path | None = None, step: int = 0) -> tuple[Path, dict]:
    """`gen-dist ema`: the reconstruction as an export (`gen-dist sample` and `eval` read it)."""
    config = run_config_file(run_dir)
    weights, info = reconstruct(run_dir, sigma_rel, step)
    out = out or output_path(run_dir, sigma_rel, info["step"])
    write_weights_file(out, {"ema.": weights}, config.read_text(), info["step"], info["module"], info["task_state"])
    return out, info
