"""Against a real two-node SLURM cluster on this machine (munged, slurmctld and two slurmd, brought up by
slurm/local_cluster.sh): jobs submitted with `gen-dist slurm submit` train across both nodes, a job signalled
mid-run checkpoints, requeues itself and resumes where it stopped, in the same W&B run, and a sweep's job array
does the same for the trial of a requeued task."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import CONFIGS, ROOT, events, run_cli, step_records

# On one pytest-xdist worker: one cluster serves the module, and its jobs run 4 ranks each on this machine.
pytestmark = pytest.mark.xdist_group("slurm")

CLUSTER = ROOT / "slurm" / "local_cluster.sh"


def _need_root() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("the local SLURM cluster needs root and apt-get")


def _new_cluster_env() -> dict:
    """Environment for sbatch/squeue/scontrol and local_cluster.sh with a state dir of its own."""
    # Not under pytest's private temp dir: munged runs as the munge user and must reach its files.
    state = Path(tempfile.mkdtemp(prefix="gen_dist_slurm_test_", dir="/tmp"))
    state.chmod(0o755)
    return {**os.environ, "GEN_DIST_SLURM_DIR": str(state), "SLURM_CONF": str(state / "slurm.conf"),
            "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _cluster(command: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(CLUSTER), command], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"local_cluster.sh {command}: {proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def slurm_env():
    """A fresh local cluster, torn down afterwards (which must leave nothing of it running)."""
    _need_root()
    env = _new_cluster_env()
    _cluster("up", env)
    yield env
    _cluster("down", env)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits in 36 shards, enough readers for 2 nodes x 8 GPUs."""
    from gen_dist.data import pack_digits

    out = tmp_path_factory.mktemp("digits36")
    pack_digits(out, shard_size=40)
    return out


def _submit(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gen_dist", "slurm", "submit", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _job_id(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"Submitted batch job (\d+)", proc.stdout)
    assert found, proc.stdout
    return found.group(1)


def _job_state(env: dict, job: str) -> str:
    """The job's state, or GONE once slurmctld has forgotten it. A busy controller can time out a query: that is
    asked again, never taken for a finished job."""
    for _ in range(30):
        proc = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True)
        found = re.search(r"JobState=(\S+)", proc.stdout)
        if found:
            return found.group(1)
        if "Invalid job id" in proc.stderr:
            return "GONE"
        time.sleep(1)
    raise AssertionError(f"scontrol show job {job} gave no state: {proc.stderr}")


def _wait(predicate, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.2)


def _wandb_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}


def _smoke(task: str, run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [str(CONFIGS / f"smoke_{task}.yaml"), f"run_dir={run_dir}", f"data.path={data}", "train.log_every=1",
            *extra]


def test_two_nodes_by_two_processes(slurm_env: dict, data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # The pinned environment set-up, where the suite runs in the venv `make` built from constraints.txt.
    pinned = Path(sys.prefix) == ROOT / ".venv"
    setup = ["--setup", str(ROOT / "slurm" / "setup_env.sh")] if pinned else []
    job = _job_id(_submit(slurm_env, *_smoke("gan", run_dir, data, "train.steps=6"), "--nodes", "2",
                          "--nproc-per-node", "2", "--cpus-per-task", "2", "--time", "00:10:00", *setup))
    log = run_dir / f"slurm-{job}.out"
    _wait(lambda: _job_state(slurm_env, job) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 300, "the job", log)
    assert _job_state(slurm_env, job) in ("COMPLETED", "GONE"), log.read_text()[-3000:]
    (start,) = events(run_dir, "start")
    assert start["world_size"] == 4 and start["backend"] == "gloo"
    assert [r["step"] for r in step_records(run_dir)] == list(range(1, 7))
    assert events(run_dir, "end")
    assert _wandb_ids(run_dir) == {(run_dir / "wandb_run_id").read_text().strip()}
    assert "2 node(s) x 2 process(es)" in log.read_text()
    if pinned:
        import torch

        assert f"environment {ROOT / '.venv'} (torch {torch.__version__})" in log.read_text()


def test_signal_checkpoints_requeues_and_resumes(slurm_env: dict, data: Path, tmp_path: Path) -> None:
    """SIGUSR1 to every process of the job (as --signal=USR1@T does before the time limit): the ranks agree to
    stop, write one checkpoint, the job requeues itself, and the restarted job resumes at that step."""
    run_dir, steps = tmp_path / "run", 150
    job = _job_id(_submit(slurm_env, *_smoke("vae", run_dir, data, f"train.steps={steps}", "train.ckpt_every=1000"),
                          "--nodes", "2", "--nproc-per-node", "2", "--cpus-per-task", "2"))
    log = run_dir / f"slurm-{job}.out"
    _wait(lambda: (run_dir / "metrics.jsonl").exists() and len(step_records(run_dir)) >= 10, 300,
          "10 steps", log)
    signalled = time.time()
    subprocess.run(["scancel", "--signal=USR1", "--full", job], env=slurm_env, check=True)
    _wait(lambda: events(run_dir, "end"), 300, "the requeued job to finish", log)
    _wait(lambda: _job_state(slurm_env, job) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 60, "the job", log)
    assert _job_state(slurm_env, job) in ("COMPLETED", "GONE"), log.read_text()[-3000:]
    (stop,) = events(run_dir, "preempted")
    resumed = events(run_dir, "resume")
    assert [e["step"] for e in resumed] == [stop["step"]] and 10 <= stop["step"] < steps
    assert [e["step"] for e in events(run_dir, "checkpoint")][:1] == [stop["step"]]
    assert [r["step"] for r in step_records(run_dir)] == list(range(1, steps + 1))  # none twice, none missing
    assert [e["world_size"] for e in events(run_dir, "start")] == [4, 4]
    assert _wandb_ids(run_dir) == {(run_dir / "wandb_run_id").read_text().strip()}
    text = log.read_text()
    assert "requeueing job" in text and "(restart 1)" in text
    ckpt = events(run_dir, "checkpoint")[0]["time"]
    print(f"signal -> checkpoint written {ckpt - signalled:.2f} s; "
          f"stop -> training resumed {resumed[0]['time'] - stop['time']:.2f} s")


def test_evaluation_runs_as_its_own_job(slurm_env: dict, data: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`gen-dist slurm submit-eval RUN --snapshots` scores a run's snapshots in a job of 2 ranks (torchrun), apart
    from training; the scores equal those the training process logged for the same weights."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torchrun's ranks: the same float reductions
    classifier, run_dir = tmp_path / "classifier", tmp_path / "run"
    run_cli("train", str(CONFIGS / "smoke_classifier.yaml"), f"run_dir={classifier}", f"data.path={data}")
    run_cli("train", *_smoke("diffusion", run_dir, data, "train.snapshot_every=3", "eval.every=3", "eval.n=20",
                             "eval.batch_size=16", f"eval.extractors=[{classifier}]", "track.backends=[jsonl]"))
    proc = subprocess.run([sys.executable, "-m", "gen_dist", "slurm", "submit-eval", str(run_dir), "--snapshots",
                           "--nproc-per-node", "2", "--time", "00:10:00"], env={**slurm_env, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    job = _job_id(proc)
    log = run_dir / "eval" / f"slurm-eval-{job}.out"
    _wait(lambda: _job_state(slurm_env, job) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 300, "the job", log)
    assert _job_state(slurm_env, job) in ("COMPLETED", "GONE"), log.read_text()[-3000:]
    assert "2 process(es)" in log.read_text()
    logged = {r["step"]: r["eval/domain/fid20"] for r in step_records(run_dir) if "eval/domain/fid20" in r}
    curve = json.loads((run_dir / "eval" / "snapshots.json").read_text())
    assert sorted(logged) == [3, 6]
    assert {c["step"]: c["eval/domain/fid20"] for c in curve} == pytest.approx(logged, rel=1e-6)


def _array_left(env: dict, job: str) -> list[str] | None:
    """The states of the array's tasks still in the queue (pending, running, requeued), or None where squeue
    did not answer (then it is asked again, never taken for an empty queue)."""
    proc = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True)
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        return None
    return proc.stdout.split()


def test_sweep_array_resumes_the_trial_of_a_requeued_task(slurm_env: dict, data: Path, tmp_path: Path) -> None:
    """`gen-dist slurm sweep --array 2`: two array tasks share 4 trials. One task, signalled mid-trial (as
    --signal does before the time limit), stops its trial at a checkpoint and requeues itself; the other task
    leaves that trial alone; the requeued task resumes it in the same run directory and W&B run. Every trial
    ends complete, begun once, with no step twice and none missing."""
    import yaml

    from gen_dist import sweep

    steps, sweep_dir = 200, tmp_path / "sweep"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "array", "dir": str(sweep_dir), "config": str(CONFIGS / "smoke_diffusion.yaml"),
        "overrides": [f"data.path={data}", "train.log_every=1", f"train.steps={steps}", "train.ckpt_every=1000"],
        "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True}},
        "objective": {"metric": "denoise/loss", "direction": "minimize"}, "trials": 4, "sampler": "random"}))
    proc = subprocess.run([sys.executable, "-m", "gen_dist", "slurm", "sweep", str(path), "--array", "2",
                           "--cpus-per-task", "1", "--time", "00:20:00"], env=slurm_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    job = _job_id(proc)

    def training() -> Path | None:
        for run_dir in sorted(sweep_dir.glob("trials/trial_*")):
            if (run_dir / "metrics.jsonl").is_file() and len(step_records(run_dir)) >= 10 \
                    and not events(run_dir, "end"):
                return run_dir
        return None

    _wait(lambda: training() is not None, 300, "a trial in training", sweep_dir / "slurm" / f"slurm-{job}_0.out")
    target = training()
    task = json.loads((target / sweep.CLAIM).read_text())["slurm_task"]
    subprocess.run(["scancel", "--signal=USR1", "--full", f"{job}_{task}"], env=slurm_env, check=True)
    log = sweep_dir / "slurm" / f"slurm-{job}_{task}.out"
    _wait(lambda: _array_left(slurm_env, job) == [], 600, "the array to finish", log)
    status = subprocess.run([sys.executable, "-m", "gen_dist", "sweep", "status", str(sweep_dir)], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    assert "4/4 trials (4 complete)" in status and "best: trial" in status, status
    for run_dir in sorted(sweep_dir.glob("trials/trial_*")):
        assert [s["resumed"] for s in events(run_dir, "start")].count(False) == 1
        assert [r["step"] for r in step_records(run_dir)] == list(range(1, steps + 1)), run_dir
        assert events(run_dir, "end")
    (stop,) = events(target, "preempted")
    assert [e["step"] for e in events(target, "resume")] == [stop["step"]] and 10 <= stop["step"] < steps
    assert json.loads((target / sweep.CLAIM).read_text())["slurm_task"] == task  # the requeued task resumed it
    assert _wandb_ids(target) == {(target / "wandb_run_id").read_text().strip()}
    text = log.read_text()
    assert f"requeueing array task {job}_{task}" in text and "restart 1" in text
    other = sweep_dir / "slurm" / f"slurm-{job}_{1 - int(task)}.out"
    assert "restart 1" not in other.read_text()  # only the signalled task was requeued
    print(re.findall(r"sweep bookkeeping [0-9.]+ s", "".join(p.read_text() for p in log.parent.glob("*.out"))))


def test_rendered_multinode_gpu_script_passes_sbatch_test_only(slurm_env: dict, data: Path, tmp_path: Path) -> None:
    proc = _submit(slurm_env, str(CONFIGS / "diffusion_fashion_mnist.yaml"), f"data.path={data}",
                   f"run_dir={tmp_path / 'run'}", "data.resolution=8", "--nodes", "2", "--gpus-per-node", "8",
                   "--cpus-per-task", "16", "--time", "1-00:00:00", "--partition", "debug", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(proc.stdout)
    assert "#SBATCH --gpus-per-node=8" in proc.stdout and "#SBATCH --nodes=2" in proc.stdout
    check = subprocess.run(["sbatch", "--test-only", str(script)], env=slurm_env, capture_output=True, text=True)
    assert check.returncode == 0 and "to start at" in check.stderr, check.stderr
    assert "on nodes n[1-2]" in check.stderr
    assert not (tmp_path / "run").exists()  # a dry run submits and creates nothing


def test_config_values_never_reach_the_shell(tmp_path: Path, digits: Path) -> None:
    """Overrides with shell syntax arrive as the same strings in the job's argument list, and a bad config
    fails before anything is submitted."""
    marker = tmp_path / "pwned"
    name = f"x$(touch {marker})'\"`touch {marker}`;"
    proc = subprocess.run([sys.executable, "-m", "gen_dist", "slurm", "submit", str(CONFIGS / "smoke_vae.yaml"),
                           f"data.path={digits}", f"run_dir={tmp_path / 'r'}", f"name={name}", "--dry-run"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    settings = proc.stdout.split("set -euo pipefail", 1)[1].split('cd "$WORKDIR"', 1)[0]
    shown = subprocess.run(["bash", "-c", settings + 'printf "%s\\n" "${TRAIN_ARGS[@]}"'], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert f"name={name}" in shown and not marker.exists()
    job_name = re.search(r"#SBATCH (.*job-name.*)", proc.stdout).group(1)
    assert marker.name in job_name and not marker.exists()
    bad = subprocess.run([sys.executable, "-m", "gen_dist", "slurm", "submit", str(CONFIGS / "smoke_vae.yaml"),
                          f"data.path={digits}", "train.stepz=1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown config key 'train.stepz'" in bad.stderr


def _cluster_port(env: dict) -> int:
    conf = (Path(env["GEN_DIST_SLURM_DIR"]) / "slurm.conf").read_text()
    return int(re.search(r"^SlurmctldPort=(\d+)$", conf, re.M).group(1))


def _tagged_processes(state: str) -> list[int]:
    tag = f"GEN_DIST_SLURM_CLUSTER={state}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            state_letter = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if tag in environ.read_bytes().split(b"\0") and state_letter != "Z":
                found.append(int(environ.parent.name))
    return found


def _listening(port: int) -> str:
    return subprocess.run(["ss", "-Hltn", f"sport >= :{port} and sport <= :{port + 2}"], capture_output=True,
                          text=True).stdout


def test_clusters_get_their_own_ports_and_up_down_up_runs_a_job(tmp_path: Path) -> None:
    """Two clusters at once are given disjoint ports; `down` returns with no process of its cluster alive and
    its ports free; `up` again in the same state dir gives a cluster that runs a two-node job."""
    _need_root()
    first, second = _new_cluster_env(), _new_cluster_env()
    try:
        _cluster("up", first)
        _cluster("up", second)
        ports = [_cluster_port(first), _cluster_port(second)]
        assert abs(ports[0] - ports[1]) >= 3 and _listening(ports[0]) and _listening(ports[1])
        state = first["GEN_DIST_SLURM_DIR"]
        assert _tagged_processes(state)
        _cluster("down", first)
        assert not _tagged_processes(state) and not _listening(ports[0]) and not Path(state).exists()
        _cluster("up", first)
        out = tmp_path / "job.out"
        job = subprocess.run(["sbatch", "--nodes=2", f"--output={out}", "--wrap", "srun printenv SLURMD_NODENAME"],
                             env=first, capture_output=True, text=True, cwd=tmp_path)
        job_id = re.search(r"Submitted batch job (\d+)", job.stdout).group(1)
        _wait(lambda: _job_state(first, job_id) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 120, "the job")
        assert sorted(out.read_text().split()) == ["n1", "n2"]
    finally:
        for env in (first, second):
            subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True, timeout=120)
    assert not _tagged_processes(state) and not _tagged_processes(second["GEN_DIST_SLURM_DIR"])
