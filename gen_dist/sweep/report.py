"""`gen-dist sweep status` and its plot: the trials table, the best trial and its command."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_dist.schema import ConfigError
from gen_dist.sweep.claims import CLAIM, claim_state, read
from gen_dist.sweep.spec import Sweep
from gen_dist.sweep.study import open_existing, trial_dir

if TYPE_CHECKING:
    pass

def rows(sweep_dir: Path) -> tuple[Sweep, list[dict[str, Any]], dict[str, Any] | None]:
    """The sweep, one row per trial (number, state, params, value, step, total, run_dir) and the best row."""
    s, study = open_existing(sweep_dir)
    out = []
    for t in study.get_trials(deepcopy=False):
        run_dir = trial_dir(sweep_dir, t.number)
        beat = read(run_dir / "heartbeat.json")
        state = t.state.name.lower()
        if state == "running":
            if claim_state(run_dir, s.stale_minutes * 60) != "alive":
                state = "interrupted"
            elif read(run_dir / CLAIM).get("requeued"):
                state = "requeued"
        out.append({"number": t.number, "state": state, "params": t.params, "value": t.value,
                    "step": beat.get("step"), "total": beat.get("total"), "run_dir": str(run_dir)})
    done = [r for r in out if r["state"] == "complete"]
    best = (min if s.lower_is_better else max)(done, key=lambda r: r["value"]) if done else None
    return s, out, best


def best_command(s: Sweep, best: dict[str, Any]) -> str:
    import shlex

    args = [s.config, *s.overrides, *(f"{k}={json.dumps(v)}" for k, v in best["params"].items())]
    return "gen-dist launch " + " ".join(shlex.quote(a) for a in args) + " --nproc N"


def format_status(sweep_dir: Path) -> str:
    s, table, best = rows(sweep_dir)
    keys = [p.key for p in s.space]
    head = ["trial", "state", *keys, s.metric, "steps", "run directory"]
    lines = []
    for r in table:
        value = "" if r["value"] is None else f"{r['value']:.6g}"
        steps = f"{r['step']}/{r['total']}" if r["step"] is not None else ""
        lines.append([str(r["number"]), r["state"], *(_short(r["params"].get(k)) for k in keys), value, steps,
                      r["run_dir"]])
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    counts = {st: sum(r["state"] == st for r in table) for st in ("complete", "pruned", "fail", "running",
                                                                  "requeued", "interrupted")}
    out = [f"sweep {s.name}: {len(table)}/{s.trials} trials ({', '.join(f'{n} {k}' for k, n in counts.items() if n)}"
           f"); objective {s.direction} {s.metric} ({s.at})", fmt.format(*head), *(fmt.format(*x) for x in lines)]
    if best is not None:
        out += [f"best: trial {best['number']}, {s.metric} = {best['value']:.6g}, run {best['run_dir']}",
                f"  {best_command(s, best)}"]
    return "\n".join(out)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot(sweep_dir: Path, out: Path) -> Path:
    """The objective over trials (with the best so far), and each parameter against the objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    s, table, _ = rows(sweep_dir)
    done = [r for r in table if r["value"] is not None]
    if not done:
        raise ConfigError(f"{sweep_dir}: no trial has finished yet, nothing to plot")
    panels = 1 + len(s.space)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.4), squeeze=False)
    ax = axes[0][0]
    xs, ys = [r["number"] for r in done], [r["value"] for r in done]
    ax.scatter(xs, ys, s=18)
    pick = min if s.lower_is_better else max
    ax.step(xs, [pick(ys[: i + 1]) for i in range(len(ys))], where="post", color="C1", label="best so far")
    for r in table:
        if r["state"] == "pruned":
            ax.axvline(r["number"], color="0.85", lw=0.8)
    ax.set(xlabel="trial", ylabel=s.metric, title=f"{s.name}: objective")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    for i, p in enumerate(s.space, start=1):
        ax = axes[0][i]
        values = [r["params"][p.key] for r in done]
        if p.kind == "categorical":
            labels = [str(c) for c in p.choices]
            ax.scatter([labels.index(str(v)) for v in values], ys, s=18)
            ax.set_xticks(range(len(labels)), labels)
        else:  # a log range as log10 on a linear axis: a narrow one has no decade to label
            ax.scatter([math.log10(v) for v in values] if p.log else values, ys, s=18)
        ax.set(xlabel=f"log10 {p.key}" if p.log and p.kind != "categorical" else p.key, ylabel=s.metric)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
