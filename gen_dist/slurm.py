"""`gen-dist slurm submit`, `submit-eval` and `sweep`: render slurm/train.sbatch for a config, slurm/eval.sbatch
for an evaluation of a run, or slurm/sweep.sbatch (a job array of sweep workers) for a sweep file, and hand it to
sbatch.

The config (or the run to evaluate) is validated, and paths made absolute, before anything is submitted. Every
value reaches the script through `shlex.quote`, so no config value or option is ever parsed by the shell."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from gen_dist.artifact import RUN_CONFIG, resolve
from gen_dist.config import load_config
from gen_dist.evaluation import check_eval_target
from gen_dist.launch import ROOT
from gen_dist.preflight import preflight, training_catalogs
from gen_dist.schema import ConfigError
from gen_dist.sweep import Sweep, load_sweep

TEMPLATE = ROOT / "slurm" / "train.sbatch"
EVAL_TEMPLATE = ROOT / "slurm" / "eval.sbatch"
SWEEP_TEMPLATE = ROOT / "slurm" / "sweep.sbatch"


@dataclass
class JobSpec:
    nodes: int = 1
    gpus_per_node: int = 0
    """0 = a CPU job (gloo), with `nproc_per_node` processes per node."""
    nproc_per_node: int = 0
    """Processes per node; 0 = one per GPU."""
    cpus_per_task: int = 0
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = ""
    constraint: str = ""
    mem: str = ""
    job_name: str = ""
    signal_seconds: int = 120
    """SIGUSR1 this long before the time limit: the ranks checkpoint and the job requeues itself."""
    setup: str = ""
    """A bash file sourced on the head node before launching (module load, venv or conda activation)."""
    python: str = sys.executable
    sbatch_args: list[str] = field(default_factory=list)
    """Further sbatch options, passed as given (e.g. --exclusive, --reservation=x)."""

    @property
    def nproc(self) -> int:
        return self.nproc_per_node or max(1, self.gpus_per_node)


def _directives(spec: JobSpec, name: str, log: Path) -> list[str]:
    opts = [f"--job-name={spec.job_name or name}", f"--nodes={spec.nodes}", f"--output={log}",
            f"--signal=USR1@{spec.signal_seconds}"]
    if spec.gpus_per_node:
        opts.append(f"--gpus-per-node={spec.gpus_per_node}")
    for key in ("cpus_per_task", "partition", "account", "qos", "time", "constraint", "mem"):
        value = getattr(spec, key)
        if value:
            opts.append(f"--{key.replace('_', '-')}={value}")
    return [f"#SBATCH {shlex.quote(o)}" for o in [*opts, *spec.sbatch_args]]


def _check_spec(spec: JobSpec) -> None:
    if spec.nodes < 1 or spec.gpus_per_node < 0 or spec.nproc_per_node < 0:
        raise ConfigError("--nodes must be >= 1, --gpus-per-node and --nproc-per-node >= 0")


def render(config: str, overrides: list[str], spec: JobSpec) -> tuple[str, Path]:
    """(job script, run directory) for CONFIG + overrides on spec.nodes x spec.nproc ranks; a ConfigError or
    DataError when the config cannot run there."""
    _check_spec(spec)
    cfg = load_config(config, overrides)
    run_dir = cfg.out_dir.resolve()
    fixed = [f"run_dir={run_dir}"] + ([] if spec.gpus_per_node else ["train.cpu=true"])
    overrides = [o for o in overrides if not o.startswith(("run_dir=", "train.cpu="))] + fixed
    cfg = load_config(config, overrides)
    preflight(cfg, spec.nodes * spec.nproc, training_catalogs(cfg))
    args = [str(Path(config).resolve()), *overrides]
    return _script(TEMPLATE, spec, cfg.name, run_dir, run_dir / "slurm-%j.out", "TRAIN_ARGS", args), run_dir


def render_eval(target: str, eval_args: list[str], spec: JobSpec) -> tuple[str, Path]:
    """(job script, run directory) of `gen-dist eval TARGET EVAL_ARGS` as a one-node job of spec.nproc ranks.
    TARGET (a run directory, a checkpoint or an export) and the evaluation settings are checked first."""
    if not Path(target).exists():
        raise ConfigError(f"{target} does not exist")
    overrides = [a for a in eval_args if "=" in a and not a.startswith("-")]
    whole_run = "--snapshots" if "--snapshots" in eval_args else ""
    check_eval_target(Path(target), overrides, whole_run, "--raw" not in eval_args)
    path = Path(target).resolve()
    run_dir = path if (path / RUN_CONFIG).is_file() else resolve(path).run_dir
    cpu = [] if spec.gpus_per_node else ["--cpu"]
    log = run_dir / "eval" / "slurm-eval-%j.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    return _script(EVAL_TEMPLATE, spec, f"eval-{run_dir.name}", run_dir, log, "EVAL_ARGS",
                   [str(path), *eval_args, *cpu]), run_dir


def render_sweep(sweep_file: str, array: int, spec: JobSpec) -> tuple[str, Sweep]:
    """(job script, sweep) of a job array of `array` sweep workers, each running its trials on spec.nodes x
    spec.nproc ranks. The sweep file, and its base config on that many ranks, are checked first."""
    _check_spec(spec)
    if array < 1:
        raise ConfigError(f"--array must be >= 1, got {array}")
    s = load_sweep(Path(sweep_file))
    cpu = [] if spec.gpus_per_node else ["train.cpu=true"]
    base = load_config(s.config, [*s.overrides, *cpu])
    preflight(base, spec.nodes * spec.nproc, training_catalogs(base))
    sweep_dir = s.dir.resolve()
    spec = replace(spec, sbatch_args=[f"--array=0-{array - 1}", *spec.sbatch_args])
    args = [str(sweep_dir), "--nproc", str(spec.nproc), *(["--cpu"] if cpu else [])]
    return _script(SWEEP_TEMPLATE, spec, s.name, sweep_dir, sweep_dir / "slurm" / "slurm-%A_%a.out", "SWEEP_ARGS",
                   args), s


def _script(template: Path, spec: JobSpec, name: str, run_dir: Path, log: Path, args_var: str,
            args: list[str]) -> str:
    settings = {
        "WORKDIR": str(Path.cwd()),
        "RUN_DIR": str(run_dir),
        "GEN_DIST_ROOT": str(ROOT),
        "PYTHON": spec.python,
        "GEN_DIST": f"{spec.python} -m gen_dist",
        "NPROC": str(spec.nproc),
        "SETUP": spec.setup,
    }
    lines = [f"{k}={shlex.quote(v)}" for k, v in settings.items()]
    lines.append(f"{args_var}=(" + " ".join(shlex.quote(a) for a in args) + ")")
    text = template.read_text().replace("#@SBATCH@", "\n".join(_directives(spec, name, log)))
    return text.replace("#@SETTINGS@", "\n".join(lines))


def submit(script: str, run_dir: Path, name: str = "job.sbatch") -> str:
    """sbatch the script (kept as run_dir/NAME); returns sbatch's output."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    path.write_text(script)
    proc = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch refused {path}: {proc.stderr.strip()}")
    return proc.stdout.strip()
