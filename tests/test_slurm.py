"""SLURM: the tasks of an `srun` step inside an `sbatch` job join as ranks.

Needs the one-node cluster that scripts/setup-slurm.sh installs and starts (CI runs it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.test_environment import JOB

pytestmark = [pytest.mark.timeout(180), pytest.mark.cluster]


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (scripts/setup-slurm.sh installs and starts it; .ci/run does)")
    ready = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if ready.returncode != 0 or not {"idle", "mixed", "allocated"} & set(ready.stdout.split()):
        pytest.skip(f"no SLURM node is up (sinfo: {ready.stdout.strip() or ready.stderr.strip()})")


def _submit(tmp_path, batch_lines: list[str]) -> tuple[str, str]:
    (tmp_path / "job.py").write_text(textwrap.dedent(JOB))
    batch = tmp_path / "batch.sh"
    batch.write_text("\n".join(["#!/bin/bash", *batch_lines, ""]))
    submitted = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--chdir", str(tmp_path), "-o", str(tmp_path / "out.txt"), str(batch)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        return job_id, (tmp_path / "out.txt").read_text()
    finally:
        if job_id:  # never leave a job behind, whatever happened
            subprocess.run(["scancel", job_id], capture_output=True)
            queue = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout
            assert job_id not in queue or "CG" in queue


def test_srun_tasks_inside_sbatch_join_and_every_task_gets_every_value(slurm, tmp_path):
    _, output = _submit(
        tmp_path,
        ["#SBATCH --ntasks=2 --overcommit --time=5", f"srun --kill-on-bad-exit=1 {sys.executable} job.py"],
    )
    for rank in (0, 1):
        assert f"rank {rank} got [(0, 2, 2), (10, 2, 2)]" in output, output


def test_the_batch_script_itself_launches_locally(slurm, tmp_path):
    """In the batch script (not an srun step) launch starts its own ranks."""
    _, output = _submit(tmp_path, ["#SBATCH --ntasks=1 --cpus-per-task=2 --time=5", f"{sys.executable} job.py"])
    assert "got [(0, 1, 1)]" in output, output
