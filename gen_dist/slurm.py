"""`gen-dist slurm submit`: render slurm/train.sbatch for a config and hand it to sbatch.

The config is validated (and its run directory fixed to an absolute path) before anything is submitted. Every
value reaches the script through `shlex.quote`, so no config value or option is ever parsed by the shell."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gen_dist.config import ConfigError, load_config
from gen_dist.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "slurm" / "train.sbatch"


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


def render(config: str, overrides: list[str], spec: JobSpec) -> tuple[str, Path]:
    """(job script, run directory) for CONFIG + overrides on spec.nodes x spec.nproc ranks; a ConfigError or
    DataError when the config cannot run there."""
    if spec.nodes < 1 or spec.gpus_per_node < 0 or spec.nproc_per_node < 0:
        raise ConfigError("--nodes must be >= 1, --gpus-per-node and --nproc-per-node >= 0")
    cfg = load_config(config, overrides)
    run_dir = cfg.out_dir.resolve()
    fixed = [f"run_dir={run_dir}"] + ([] if spec.gpus_per_node else ["train.cpu=true"])
    overrides = [o for o in overrides if not o.startswith(("run_dir=", "train.cpu="))] + fixed
    cfg = load_config(config, overrides)
    preflight(cfg, world_size=spec.nodes * spec.nproc)
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
    lines.append("TRAIN_ARGS=(" + " ".join(shlex.quote(a) for a in [str(Path(config).resolve()), *overrides]) + ")")
    text = TEMPLATE.read_text()
    text = text.replace("#@SBATCH@", "\n".join(_directives(spec, cfg.name, run_dir / "slurm-%j.out")))
    return text.replace("#@SETTINGS@", "\n".join(lines)), run_dir


def submit(script: str, run_dir: Path) -> str:
    """sbatch the script (kept as run_dir/job.sbatch); returns sbatch's output."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch refused {path}: {proc.stderr.strip()}")
    return proc.stdout.strip()
