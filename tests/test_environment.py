"""Cluster environments: each launcher's variables are read right, and ranks it starts join."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import phalanx as px
from phalanx import environment

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
        ("rack1-n[001-002]", ["rack1-n001", "rack1-n002"]),
    ],
)
def test_slurm_nodelist_is_expanded(nodelist, hosts):
    assert environment.expand_slurm_nodelist(nodelist) == hosts


def test_slurm_task_variables(monkeypatch):
    for name, value in {
        "SLURM_PROCID": "3",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_JOB_NODELIST": "node[07-08]",
        "SLURM_JOB_ID": "1234",
    }.items():
        monkeypatch.setenv(name, value)
    found = environment.detect_environment()
    assert isinstance(found, environment.Slurm)
    assert (found.global_rank(), found.world_size(), found.local_rank(), found.local_world_size()) == (3, 4, 1, 2)
    assert (found.node_rank(), found.main_address()) == (1, "node07")
    assert found.main_port() == environment.port_from_job_id("slurm-1234-0") and 20000 <= found.main_port() < 32000


def test_slurm_batch_script_is_not_a_rank(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_ID", "batch")
    assert environment.detect_environment() is None


def test_explicit_master_variables_win(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "4567")
    found = environment.detect_environment()
    assert isinstance(found, environment.OpenMPI)
    assert (found.main_address(), found.main_port()) == ("10.1.2.3", 4567)


def test_open_mpi_on_several_nodes_takes_mpirun_host(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "2961834.0;tcp://10.9.0.1,172.17.0.1:45345")
    assert environment.OpenMPI().main_address() == "10.9.0.1"


def test_mpich_variables(monkeypatch):
    for name, value in {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}.items():
        monkeypatch.setenv(name, value)
    found = environment.detect_environment()
    assert isinstance(found, environment.MPICH)
    assert (found.global_rank(), found.local_rank(), found.node_rank(), found.main_address()) == (1, 1, 0, "127.0.0.1")


def test_cluster_env_without_a_launcher_is_a_clear_error():
    with pytest.raises(px.LaunchError, match=r"cluster='env'.*torchrun, srun or mpirun"):
        px.launch(px.get_rank, platform=px.Platform(device="cpu", cluster="env"))


JOB = """
import os, sys, time, phalanx as px

def work(scale):
    if os.environ.get("FAIL_RANK") == str(px.get_rank()):
        raise ValueError(f"rank {px.get_rank()} was told to fail")
    if os.environ.get("BUSY_RANK") == str(px.get_rank()):
        time.sleep(1.0)  # still computing when the other rank fails
    return px.get_rank() * scale, px.get_world_size(), px.all_reduce(1, op="sum")

try:
    values = px.launch(work, 10, platform=px.Platform(device="cpu"))
except px.WorkerError as error:
    print(f"WorkerError rank={error.rank} type={error.exc_type}", flush=True)
    sys.exit(3)
names = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
launcher_rank = next((os.environ[name] for name in names if name in os.environ), "local")
print(f"rank {launcher_rank} got {values}", flush=True)
"""


def _run(command: list[str], tmp_path, env: dict | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(JOB))
    return subprocess.run(
        [*command, str(script)],
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, **(env or {})},
        cwd=tmp_path,
    )


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def test_torchrun_ranks_join_and_every_rank_gets_every_value(tmp_path):
    result = _run(TORCHRUN, tmp_path)
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        assert f"rank {rank} got [(0, 2, 2), (10, 2, 2)]" in result.stdout


def test_torchrun_rank_failure_names_the_failing_rank(tmp_path):
    result = _run(TORCHRUN, tmp_path, env={"FAIL_RANK": "1"})
    assert result.returncode != 0
    # rank 1 raised; rank 0, blocked in a collective, learns the cause from the store
    assert result.stdout.count("WorkerError rank=1 type=ValueError") == 2, result.stdout


OPEN_MPI = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable]
MPICH_RUN = ["mpirun.mpich", "-np", "2", sys.executable]


def test_under_torchrun_a_rank_still_busy_when_another_fails_names_the_cause_too(tmp_path):
    """torchrun stops every process once one has exited: the failed rank waits for the others first."""
    result = _run(TORCHRUN, tmp_path, env={"FAIL_RANK": "1", "BUSY_RANK": "0"})
    assert result.returncode != 0
    assert result.stdout.count("WorkerError rank=1 type=ValueError") == 2, result.stdout


def _require(launcher: list[str]) -> None:
    if shutil.which(launcher[0]) is None:
        pytest.skip(f"{launcher[0]} is not installed (apt-get install openmpi-bin mpich; .ci/run does)")


@pytest.mark.cluster
@pytest.mark.parametrize("launcher", [OPEN_MPI, MPICH_RUN], ids=["openmpi", "mpich"])
def test_mpi_ranks_join_and_every_rank_gets_every_value(launcher, tmp_path):
    _require(launcher)
    result = _run(launcher, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        assert f"rank {rank} got [(0, 2, 2), (10, 2, 2)]" in result.stdout


@pytest.mark.cluster
@pytest.mark.parametrize("launcher", [OPEN_MPI, MPICH_RUN], ids=["openmpi", "mpich"])
def test_mpi_rank_failure_names_the_failing_rank(launcher, tmp_path):
    _require(launcher)
    result = _run(launcher, tmp_path, env={"FAIL_RANK": "0"})
    assert result.returncode != 0
    # rank 0 hosts the store: it keeps it up until rank 1 has read the cause from it
    assert result.stdout.count("WorkerError rank=0 type=ValueError") == 2, result.stdout + result.stderr


def test_torchrun_processes_can_launch_several_times(tmp_path):
    script = tmp_path / "again.py"
    script.write_text(
        "import phalanx as px\n"
        "for i in range(3):\n"
        "    values = px.launch(lambda: px.get_rank() + 10 * i, platform=px.Platform(device='cpu'))\n"
        "    print(f'launch {i} {values}', flush=True)\n"
    )
    result = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr
    for i in range(3):
        assert result.stdout.count(f"launch {i} [{10 * i}, {10 * i + 1}]") == 2, result.stdout


@pytest.mark.cluster
def test_rank_helpers_answer_for_the_launcher_outside_a_launch(tmp_path):
    _require(OPEN_MPI)
    script = tmp_path / "who.py"
    script.write_text("import phalanx as px\nprint('who', px.get_rank(), px.get_world_size(), px.get_node_rank())\n")
    result = subprocess.run([*OPEN_MPI, str(script)], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr
    assert "who 0 2" in result.stdout and "who 1 2" in result.stdout


def test_torchrun_agent_store_wins_over_an_explicit_port(tmp_path):
    script = tmp_path / "port.py"
    script.write_text(
        "import phalanx as px\n"
        "platform = px.Platform(device='cpu', master_port=1, timeout=20)\n"
        "print(f'values {px.launch(px.get_rank, platform=platform)}', flush=True)\n"
    )
    result = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("values [0, 1]") == 2
    assert "is ignored under torchrun" in result.stderr
