"""Two "nodes" on one machine: two network namespaces joined by a veth pair, one launcher per namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, events, smoke_args, step_records

# One at a time under pytest-xdist: the tests share fixed names (netns).
pytestmark = pytest.mark.xdist_group("netns")

HELPER = ROOT / "launcher" / "multinode.sh"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def two_nodes():
    """Namespaces (name, address) with their own network stacks; torn down afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    tag = f"gd{os.getpid() % 100000}"
    nodes = [(f"{tag}a", "10.231.0.1"), (f"{tag}b", "10.231.0.2")]
    try:
        for ns, _ in nodes:
            _ip("netns", "add", ns)
        # The same interface name in both namespaces lets one GLOO_SOCKET_IFNAME serve both.
        _ip("link", "add", "gdveth", "netns", nodes[0][0], "type", "veth", "peer", "name", "gdveth",
            "netns", nodes[1][0])
        for ns, addr in nodes:
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "gdveth")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "gdveth", "up")
        yield nodes
    finally:
        for ns, _ in nodes:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_nodes_one_process_each(two_nodes, launcher: str, tmp_path: Path, digits: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "NNODES": "2", "MASTER_ADDR": two_nodes[0][1], "MASTER_PORT": "29561", "NPROC": "1",
           "LAUNCHER": launcher, "GEN_DIST": f"{sys.executable} -m gen_dist", "PYTHON": sys.executable,
           "RDZV_ID": run_dir.name, "GLOO_SOCKET_IFNAME": "gdveth", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true"}
    procs = [subprocess.Popen(["ip", "netns", "exec", ns, str(HELPER), *smoke_args("gan", run_dir, digits),
                               "train.steps=4"],
                              env={**env, "NODE_RANK": str(rank), "NODE_ADDR": addr}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, (ns, addr) in enumerate(two_nodes)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    (start,) = events(run_dir, "start")
    assert start["world_size"] == 2 and start["backend"] == "gloo"
    assert [r["step"] for r in step_records(run_dir)] == [2, 4]
    assert (run_dir / "checkpoints" / "step_00000004" / "meta.json").exists()
