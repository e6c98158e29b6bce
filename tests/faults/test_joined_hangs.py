"""Hang reports for ranks a launcher started: a stuck rank's stack reaches the others' HangError.

torchrun and mpirun start the processes, so phalanx cannot signal them for a faulthandler dump
as it does its own workers; each joined rank answers a request on the job's store instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

JOB = """
import sys, time
import torch
import phalanx as px

def stuck_in_user_code():
    while True:  # never reaches the collective
        time.sleep(0.05)

def work():
    if px.get_rank() == 1:
        stuck_in_user_code()
    px.all_reduce(torch.ones(1))

try:
    px.launch(work, platform=px.Platform(device="cpu", timeout=3))
except px.HangError as error:
    print(f"HangError never_arrived={error.never_arrived} stacks={sorted(error.stacks)}", flush=True)
    print(f"rank 1 was in stuck_in_user_code: {'in stuck_in_user_code' in error.stacks.get(1, '')}", flush=True)
    print(f"verdict: {error.verdict}", flush=True)
    sys.exit(3)
except px.WorkerError as error:
    print(f"WorkerError, not a hang report: {error}", flush=True)
    sys.exit(4)
"""

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
OPEN_MPI = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable]


def _run(command: list[str], tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(JOB))
    return subprocess.run(
        [*command, str(script)], capture_output=True, text=True, timeout=100, env=dict(os.environ), cwd=tmp_path
    )


def _check_report(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "HangError never_arrived=[1] stacks=[1]" in result.stdout, output
    assert "rank 1 was in stuck_in_user_code: True" in result.stdout, output
    assert "rank(s) [0] waited in all_reduce" in result.stdout, output


def test_under_torchrun_a_stuck_rank_s_stack_reaches_the_hang_report(tmp_path):
    _check_report(_run(TORCHRUN, tmp_path))


@pytest.mark.cluster
def test_under_mpirun_a_stuck_rank_s_stack_reaches_the_hang_report(tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (apt-get install openmpi-bin; .ci/run does)")
    _check_report(_run(OPEN_MPI, tmp_path))
