"""Cluster environments: each launcher's variables are read right, and ranks it starts join."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import phalanx as px
from phalanx import environment
from tests.by_hand import run_by_hand

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


# -- registration: one class per cluster, found by detect_environment ---------------------------


class _Scheduler(environment.Environment):
    """A cluster of one's own: its processes carry MY_RANK and MY_SIZE."""

    name = "my-scheduler"
    place_variables = ("MY_RANK", "MY_SIZE")

    @staticmethod
    def detect() -> bool:
        return "MY_RANK" in os.environ

    def world_size(self) -> int:
        return int(os.environ["MY_SIZE"])

    def global_rank(self) -> int:
        return int(os.environ["MY_RANK"])

    def local_rank(self) -> int:
        return self.global_rank()

    def local_world_size(self) -> int:
        return self.world_size()

    def node_rank(self) -> int:
        return 0

    def main_address(self) -> str:
        return "127.0.0.1"

    def main_port(self) -> int:
        return 29400


@pytest.fixture
def scheduler_registered(monkeypatch):
    """`_Scheduler` registered for one test, then removed, so that other tests see the built-ins alone."""
    monkeypatch.setenv("MY_RANK", "1")
    monkeypatch.setenv("MY_SIZE", "2")
    environment.register_environment(_Scheduler)
    yield _Scheduler
    if _Scheduler in environment.registered_environments():
        environment.unregister_environment(_Scheduler)


def test_the_built_in_launchers_are_registered_in_detection_order():
    built_in = (environment.TorchElastic, environment.Slurm, environment.OpenMPI, environment.MPICH)
    assert environment.registered_environments() == built_in
    assert environment.ENVIRONMENTS == built_in


def test_a_registered_environment_is_detected(scheduler_registered):
    found = environment.detect_environment()
    assert isinstance(found, _Scheduler)
    assert (found.global_rank(), found.world_size()) == (1, 2)
    assert environment.ENVIRONMENTS[-1] is _Scheduler  # ENVIRONMENTS follows the registry


def test_an_unregistered_environment_is_no_longer_detected(scheduler_registered):
    environment.unregister_environment(_Scheduler)
    assert environment.detect_environment() is None
    assert _Scheduler not in environment.ENVIRONMENTS


def test_an_environment_registered_before_another_wins_where_both_match(scheduler_registered, monkeypatch):
    for name, value in {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}.items():
        monkeypatch.setenv(name, value)
    assert isinstance(environment.detect_environment(), environment.Slurm)  # _Scheduler was registered last
    environment.register_environment(_Scheduler, before=environment.Slurm)
    assert environment.registered_environments().index(_Scheduler) == 1
    assert isinstance(environment.detect_environment(), _Scheduler)


def test_an_environment_missing_a_method_can_be_neither_made_nor_registered():
    class Incomplete(environment.Environment):
        @staticmethod
        def detect() -> bool:
            return True

        def global_rank(self) -> int:
            return 0

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
    with pytest.raises(TypeError, match=r"Incomplete cannot be registered: it does not implement .*world_size"):
        environment.register_environment(Incomplete)
    assert Incomplete not in environment.registered_environments()


def test_registering_something_that_is_not_an_environment_is_refused():
    with pytest.raises(TypeError, match="needs an Environment subclass"):
        environment.register_environment(dict)


# -- Explicit: a place stated by hand -------------------------------------------------------------


@pytest.fixture
def no_master_variables(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)


def test_explicit_defaults_to_this_node_and_torchruns_default_port(no_master_variables):
    place = environment.Explicit(3, 4)
    assert (place.global_rank(), place.world_size(), place.local_rank(), place.local_world_size()) == (3, 4, 3, 4)
    assert (place.node_rank(), place.main_address(), place.main_port()) == (0, "127.0.0.1", 29500)
    assert not environment.Explicit.detect() and environment.Explicit not in environment.ENVIRONMENTS


def test_explicit_takes_the_store_from_master_variables(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "4567")
    place = environment.Explicit(0, 2)
    assert (place.main_address(), place.main_port()) == ("10.1.2.3", 4567)
    assert environment.Explicit(0, 2, address="10.9.9.9", port=1234).main_port() == 1234  # stated values win


def test_explicit_on_several_nodes_derives_the_node_and_local_rank(no_master_variables):
    place = environment.Explicit(3, 4, local_world_size=2)
    assert (place.local_rank(), place.node_rank()) == (1, 1)
    environment.check_place(place)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rank": 2, "world_size": 2}, r"Explicit\(rank=2\) is not valid: .* from 0 to 1"),
        ({"rank": -1, "world_size": 2}, r"Explicit\(rank=-1\)"),
        ({"rank": True, "world_size": 2}, r"Explicit\(rank=True\)"),
        ({"rank": 0, "world_size": 0}, r"Explicit\(world_size=0\) is not valid: .*>= 1"),
        ({"rank": 0, "world_size": "2"}, r"Explicit\(world_size='2'\)"),
        ({"rank": 0, "world_size": 2, "local_world_size": 3}, r"Explicit\(local_world_size=3\) .* 1 to world_size=2"),
        ({"rank": 0, "world_size": 4, "local_world_size": 2, "local_rank": 2}, r"Explicit\(local_rank=2\) .* 0 to 1"),
        ({"rank": 0, "world_size": 2, "node_rank": -1}, r"Explicit\(node_rank=-1\)"),
        ({"rank": 0, "world_size": 2, "port": 0}, r"Explicit\(port=0\) .* 1 to 65535"),
        ({"rank": 0, "world_size": 2, "port": 70000}, r"Explicit\(port=70000\)"),
        ({"rank": 0, "world_size": 2, "address": ""}, r"Explicit\(address=''\)"),
    ],
)
def test_explicit_refuses_a_bad_value_naming_it(values, message, no_master_variables):
    with pytest.raises(px.PlatformError, match=message):
        environment.Explicit(**values)


@pytest.mark.parametrize("value", ["abc", "0"])
def test_explicit_refuses_a_bad_master_port_naming_the_variable(value, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", value)
    with pytest.raises(px.PlatformError, match=rf"Explicit\(port=.*It came from MASTER_PORT='{value}'"):
        environment.Explicit(0, 2)


def test_a_platform_with_an_explicit_environment_joins_it(no_master_variables):
    platform = px.Platform(device="cpu", environment=environment.Explicit(1, 2))
    assert platform.cluster == "env" and platform.environment == environment.Explicit(1, 2)


# -- the examples of docs/platforms/index.md ------------------------------------------------------

PLATFORMS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "platforms" / "index.md"


def _page_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", PLATFORMS_PAGE.read_text(), flags=re.DOTALL)
    return next(block for block in blocks if marker in block)


@pytest.mark.cluster
@pytest.mark.timeout(100)
def test_the_pages_two_terminals_meet_through_their_explicit_places(tmp_path):
    results = run_by_hand(_page_block("Explicit(rank="), tmp_path, secret="12" * 32)
    for code, out, err in results:
        assert code == 0, out + err
        assert "values [(0, 2), (1, 2)]" in out, out + err


def test_the_pages_scheduler_class_is_detected_before_slurm(monkeypatch):
    namespace: dict = {}
    exec(compile(_page_block("class MyScheduler(Environment)"), str(PLATFORMS_PAGE), "exec"), namespace)
    scheduler = namespace["MyScheduler"]
    try:
        place = {"MYSCHED_RANK": "3", "MYSCHED_SIZE": "4", "MYSCHED_LOCAL": "1", "MYSCHED_PER_NODE": "2"}
        slurm = {"SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"}
        for name, value in {**place, **slurm, "MYSCHED_FIRST_HOST": "n01", "MYSCHED_JOB_ID": "7"}.items():
            monkeypatch.setenv(name, value)
        found = environment.detect_environment()
        assert isinstance(found, scheduler)
        assert (found.global_rank(), found.local_rank(), found.node_rank(), found.main_address()) == (3, 1, 1, "n01")
        environment.check_place(found)
    finally:
        environment.unregister_environment(scheduler)
