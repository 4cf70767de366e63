"""The command lines that start `gen-dist train` on N local processes (and M machines) with accelerate launch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gen_dist.parallel import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
"""The checkout gen_dist runs from: slurm/ holds the job templates and the rank launcher (slurm/ranks.sh)."""


@dataclass
class LaunchSpec:
    nproc: int | None = None
    """Processes per machine; None = as the accelerate config says (1 without one)."""
    num_machines: int = 1
    machine_rank: int = 0
    main_ip: str = "127.0.0.1"
    port: int = 0
    """Rendezvous port of machine rank 0; 0 = 29500 (or the accelerate config's)."""
    cpu: bool = False
    """Force CPU (gloo) even when GPUs are present."""
    accelerate_config: str = ""
    """An accelerate config file (e.g. launcher/accelerate/fsdp.yaml); machine flags still apply."""
    mixed_precision: str = "no"
    strategy: str = "ddp"
    """parallel.strategy of the run: DeepSpeed must not see ACCELERATE_USE_CPU (it turns DeepSpeed off)."""


def use_cpu(spec: LaunchSpec) -> bool:
    return spec.cpu or not torch.cuda.is_available()


def cpu_threads(nproc: int) -> int:
    """Threads per CPU rank: OMP_NUM_THREADS where the caller set it (a sweep running several trials at once
    divides the cores among them), else the cores divided by the ranks."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else max(1, (os.cpu_count() or 1) // nproc)


def launch_command(spec: LaunchSpec, args: list[str], command: str = "train") -> tuple[list[str], dict[str, str]]:
    """The accelerate launch command running `gen-dist COMMAND ARGS`, and the extra environment it needs.

    On CPU, `--cpu` would silently start a single process and `--multi_gpu` alone would start independent
    world-size-1 runs; `--multi_gpu` together with ACCELERATE_USE_CPU=1 gives one gloo group. DeepSpeed runs
    name the gloo backend themselves and must not get ACCELERATE_USE_CPU."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    strategy = STRATEGIES[spec.strategy]
    env = {"ACCELERATE_USE_CPU": "1"} if use_cpu(spec) and strategy.cpu_flag else {}
    if spec.accelerate_config:
        cmd += ["--config_file", spec.accelerate_config]
        if spec.nproc is None:
            # The config file decides the process count and topology.
            port = ["--main_process_port", str(spec.port)] if spec.port else []
            return [*cmd, *port, "-m", "gen_dist", command, *args], env
    nproc = spec.nproc or 1
    total = nproc * spec.num_machines
    if total > 1 and not spec.accelerate_config:
        cmd += ["--multi_gpu"]
    if use_cpu(spec):
        cmd += ["--num_cpu_threads_per_process", str(cpu_threads(nproc))]
    cmd += ["--num_processes", str(total), "--num_machines", str(spec.num_machines),
            "--machine_rank", str(spec.machine_rank),
            # auto is decided by each rank from its device (the trainer passes its choice to Accelerate).
            "--mixed_precision", "no" if strategy.own_precision or spec.mixed_precision == "auto"
            else spec.mixed_precision,
            "--dynamo_backend", "no"]
    if total > 1:
        cmd += ["--main_process_ip", spec.main_ip, "--main_process_port", str(spec.port or 29500)]
    cmd += ["-m", "gen_dist", command, *args]
    return cmd, env


def run(spec: LaunchSpec, args: list[str], command: str = "train") -> int:
    cmd, env = launch_command(spec, args, command)
    # SIGUSR1 asks the ranks to checkpoint and stop; the launcher (and accelerate's agent, which inherits the
    # disposition) must outlive it rather than die and take the ranks down mid-checkpoint.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    return subprocess.call(cmd, env={**os.environ, **env})
