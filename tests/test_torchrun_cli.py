"""`phalanx run` as a drop-in for torchrun: its command line, its variables, its logs, its signals.

The same scripts run under `phalanx run` and `python -m torch.distributed.run --standalone`
(torchrun lets the system pick its port only so), and what they see must be the same.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import queue
import re
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.distributed import run as torch_run

import phalanx as px
from phalanx import cli

pytestmark = pytest.mark.timeout(120)

# Every variable torchrun's agent sets in a worker (torch/distributed/elastic/agent/server/local_elastic_agent.py),
# with the one its log specs set and the ones it sets in its own environment for the workers to inherit.
TORCHRUN_VARIABLES = [
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS", "TORCHELASTIC_SIGNALS_TO_HANDLE",
]  # fmt: skip
# Different in every run by nature (a fresh id, a free port, a temporary folder): compared for presence.
DIFFERENT_BY_NATURE = {"TORCHELASTIC_RUN_ID", "MASTER_PORT", "TORCHELASTIC_ERROR_FILE"}


def _environment(**changes: str | None) -> dict[str, str]:
    environment = dict(os.environ)
    for name in [name for name in environment if name.startswith(("PET_", "TORCHELASTIC_"))]:
        del environment[name]
    environment.pop("OMP_NUM_THREADS", None)
    for name, value in changes.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return environment


def phalanx_run(*arguments: str, cwd: Path, **environment: str | None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "phalanx", "run", *arguments]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=100, env=_environment(**environment)
    )


def torchrun(*arguments: str, cwd: Path, **environment: str | None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", *arguments]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=100, env=_environment(**environment)
    )


def _write(folder: Path, name: str, source: str) -> str:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def _records(output: str) -> list[dict]:
    """The JSON lines a script printed, whatever prefix a launcher put before them, in a stable order."""
    records = [json.loads(line[line.index("{") :]) for line in output.splitlines() if "{" in line]
    return sorted(records, key=lambda record: json.dumps(record, sort_keys=True))


def _parse(*options: str) -> argparse.Namespace:
    return cli._build_parsers()[1].parse_args(list(options))


# -- the command line -------------------------------------------------------------------------------


def _option_strings(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {option: action.dest for action in parser._actions for option in action.option_strings if option != "-h"}


def test_every_torchrun_option_is_taken_in_each_of_its_spellings_with_torchruns_name():
    theirs = _option_strings(torch_run.get_args_parser())
    ours = _option_strings(cli._build_parsers()[1])
    assert sorted(set(theirs) - set(ours)) == []
    # The same name behind each option: torchrun reads its PET_<NAME> defaults by it, and so does phalanx.
    assert {option: ours[option] for option in theirs} == theirs


def test_help_shows_phalanxs_names_and_torchruns(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["run", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for names in [
        "--nproc-per-node N, --nproc_per_node N, --n-procs N, --n_procs N",
        "--rdzv-backend RDZV_BACKEND, --rdzv_backend RDZV_BACKEND",
        "-r REDIRECTS, --redirects REDIRECTS",
        "--no-python, --no_python",
        "-m, --module",
        "--device DEVICE",
        "--distributed",
        "--checkpoint CHECKPOINT",
    ]:
        assert names in text


def test_a_mistyped_option_prints_the_usage_of_phalanx_run(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["run", "--nprocs-per-node", "2", "train.py"])
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: phalanx run ")
    assert "unrecognized arguments: --nprocs-per-node" in error


def test_n_procs_phalanxs_own_name_is_taken_too():
    assert px.Platform.from_args(_parse("--n-procs", "3", "--device", "cpu", "x.py")).n_procs == 3


@pytest.mark.parametrize("word", ["cpu", "auto"])
def test_nproc_per_node_words_count_as_torchrun_counts(word):
    platform = px.Platform.from_args(_parse("--nproc-per-node", word, "x.py"))
    assert platform.n_procs == torch_run.determine_local_world_size(word)
    if not torch.accelerator.is_available():
        assert platform.device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="gpu counts the visible GPUs here")
def test_nproc_per_node_gpu_without_a_gpu_is_refused_naming_the_fix():
    with pytest.raises(px.PlatformError, match=r"--nproc-per-node gpu: no cuda device.*--nproc-per-node cpu"):
        px.Platform.from_args(_parse("--nproc-per-node", "gpu", "x.py"))


def test_nnodes_as_a_fixed_range_is_a_node_count():
    platform = px.Platform.from_args(_parse("--nnodes", "2:2", "--master-port", "29411", "--node-rank", "1", "x.py"))
    assert (platform.n_nodes, platform.node_rank) == (2, 1)


def test_rendezvous_endpoint_is_where_the_ranks_meet():
    static = px.Platform.from_args(_parse("--rdzv-endpoint", "10.1.2.3:29411", "x.py"))
    assert (static.master_addr, static.master_port) == ("10.1.2.3", 29411)
    options = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "node0", "--nnodes", "2", "--node-rank", "0"]
    c10d = px.Platform.from_args(_parse(*options, "x.py"))
    assert (c10d.master_addr, c10d.master_port) == ("node0", 29400)  # torch's c10d port when none is given
    standalone = px.Platform.from_args(_parse("--standalone", "--master-port", "29411", "x.py"))
    assert (standalone.master_addr, standalone.master_port) == ("localhost", None)  # torchrun's localhost:0


def test_rdzv_conf_join_timeout_bounds_the_wait_for_the_store():
    platform = px.Platform.from_args(_parse("--rdzv-conf", "join_timeout=7,last_call_timeout=1", "x.py"))
    assert platform.connect_timeout == 7.0


def test_max_restarts_is_the_platforms():
    assert px.Platform.from_args(_parse("--max-restarts", "2", "x.py")).max_restarts == 2


def test_torchruns_environment_variables_give_the_defaults(monkeypatch):
    for name, value in {"PET_NPROC_PER_NODE": "3", "PET_MAX_RESTARTS": "2", "PET_STANDALONE": "1"}.items():
        monkeypatch.setenv(name, value)
    args = _parse("--device", "cpu", "x.py")
    assert (args.nproc_per_node, args.max_restarts, args.standalone) == (3, 2, True)
    assert _parse("--nproc-per-node", "1", "x.py").nproc_per_node == 1  # the command line wins


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--nnodes", "1:4"], "elastic job, which phalanx does not run.*--nnodes 4"),
        (["--rdzv-backend", "etcd"], "no etcd rendezvous.*--rdzv-backend c10d --rdzv-endpoint"),
        (["--rdzv-backend", "etcd-v2"], "no etcd rendezvous"),
        (["--rdzv-backend", "zookeeper"], "allowed are static"),
        (["--rdzv-conf", "colour=blue"], "no rendezvous setting 'colour'.*join_timeout"),
        (["--rdzv-conf", "is_host=false"], "node 0 hosts the store"),
        (["--standalone", "--nnodes", "2", "--master-port", "29411"], "--standalone: it runs one node"),
        (["--rdzv-backend", "c10d", "--rdzv-endpoint", "h:1", "--nnodes", "2"], "Give each node its --node-rank"),
        (["-m", "--no-python"], "cannot go with -m"),
        (["--local-addr", "10.0.0.2"], "--local-addr 10.0.0.2: every node reaches node 0"),
        (["--logs-specs", "mine"], "torchrun.logs_specs plugin"),
        (["--numa-binding", "node"], "does not bind ranks to NUMA nodes.*numactl"),
        (["--shutdown-timeout", "30"], "0.8 s"),
        (["--virtual-local-rank"], "LOCAL_RANK is its place on the node"),
        (["--event-log-handler", "console"], "no torchelastic events"),
        (["--signals-to-handle", "SIGTERM,SIGUSR1"], "SIGUSR1 asks a rank for its stack"),
        (["--signals-to-handle", "SIGNOPE"], "not a signal's name"),
        (["--redirects", "4"], "not one of torchrun's forms"),
    ],
)
def test_what_phalanx_cannot_do_is_refused_under_run_usage_saying_what_to_use(tmp_path, capsys, options, message):
    script = _write(tmp_path, "train.py", "print('never runs')\n")
    with pytest.raises(SystemExit) as done:
        cli.main(["run", *options, script])
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: phalanx run ")
    assert re.search(message, " ".join(error.split())), error


def test_accepted_options_without_effect_run_the_script(tmp_path):
    script = _write(tmp_path, "hello.py", "import os\nprint('hello from', os.environ['RANK'])\n")
    options = ["--monitor-interval", "5", "--start-method", "fork", "--run-path", "--event-log-handler", "null"]
    options += ["--signals-to-handle", "SIGTERM,SIGINT", "--rdzv-conf", "read_timeout=3,use_libuv=1"]
    result = phalanx_run(*options, "--nproc_per_node", "2", script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[rank 1] hello from 1" in result.stdout


# -- scripts written for torchrun -------------------------------------------------------------------

DDP_SCRIPT = """
# In the style of pytorch/examples distributed/ddp-tutorial-series (multigpu_torchrun.py), on CPU.
import argparse
import functools
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def report(record):
    sys.stdout.write(json.dumps(record) + "\\n")  # one write: torchrun's ranks share one unbuffered stdout


class Trainer:
    def __init__(self, model, train_data, optimizer, snapshot_path):
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.global_rank = int(os.environ["RANK"])
        self.model = model
        self.train_data = train_data
        self.optimizer = optimizer
        self.snapshot_path = snapshot_path
        self.epochs_run = 0
        if os.path.exists(snapshot_path):
            self._load_snapshot(snapshot_path)
        self.model = DDP(self.model)

    def _load_snapshot(self, snapshot_path):
        snapshot = torch.load(snapshot_path, map_location="cpu")
        self.model.load_state_dict(snapshot["MODEL_STATE"])
        self.epochs_run = snapshot["EPOCHS_RUN"]
        report({"rank": self.global_rank, "resumed_at": self.epochs_run})

    def _run_epoch(self, epoch):
        self.train_data.sampler.set_epoch(epoch)
        losses = []
        for source, targets in self.train_data:
            self.optimizer.zero_grad()
            loss = F.mse_loss(self.model(source), targets)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        report({"rank": self.global_rank, "epoch": epoch, "losses": losses})

    def _save_snapshot(self, epoch):
        torch.save({"MODEL_STATE": self.model.module.state_dict(), "EPOCHS_RUN": epoch + 1}, self.snapshot_path)

    def train(self, max_epochs):
        for epoch in range(self.epochs_run, max_epochs):
            self._run_epoch(epoch)
            if self.global_rank == 0:
                self._save_snapshot(epoch)
        weights = [parameter.tolist() for parameter in self.model.module.parameters()]
        report({"rank": self.global_rank, "weights": weights})


def main(total_epochs, batch_size, snapshot_path):
    init_process_group(backend="gloo")
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=DistributedSampler(dataset))
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    Trainer(model, loader, optimizer, snapshot_path).train(total_epochs)
    destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("total_epochs", type=int)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--snapshot_path", default="snapshot.pt")
    args = parser.parse_args()
    main(args.total_epochs, args.batch_size, args.snapshot_path)
"""


_TORCH_EXIT_ABORT = "terminate called without an active exception"


def _torchrun_past_its_exit_abort(*arguments: str, cwd: Path, snapshot: Path) -> subprocess.CompletedProcess:
    """torchrun, started again (from the same snapshot) when a worker aborted in torch's own exit.

    A worker that made a gloo group aborts now and then as its process ends, after the script
    is done ("terminate called without an active exception", SIGABRT): 4 of 84 torchrun runs of
    this script here, none of 30 under phalanx run, whose ranks end with os._exit. The run
    itself is deterministic, so a second try shows what the first would have.
    """
    kept = snapshot.read_bytes() if snapshot.exists() else None
    for _ in range(3):
        result = torchrun(*arguments, cwd=cwd)
        if result.returncode == 0 or _TORCH_EXIT_ABORT not in result.stderr:
            return result
        if kept is None:
            snapshot.unlink(missing_ok=True)
        else:
            snapshot.write_bytes(kept)
    return result


@pytest.mark.timeout(300)
def test_a_torchrun_training_script_trains_and_resumes_alike_under_phalanx_run_and_torchrun(tmp_path):
    outcomes = {}
    for launcher in ("phalanx", "torchrun"):
        folder = tmp_path / launcher
        folder.mkdir()
        script = _write(folder, "multigpu_torchrun.py", DDP_SCRIPT)
        if launcher == "phalanx":
            start = functools.partial(phalanx_run, "--no-prefix")
        else:
            start = functools.partial(_torchrun_past_its_exit_abort, "--standalone", snapshot=folder / "snapshot.pt")
        first = start("--nproc-per-node", "2", script, "2", cwd=folder)
        assert first.returncode == 0, first.stderr
        assert (folder / "snapshot.pt").is_file()
        resumed = start("--nproc-per-node", "2", script, "4", cwd=folder)
        assert resumed.returncode == 0, resumed.stderr
        outcomes[launcher] = (_records(first.stdout), _records(resumed.stdout))
    (first, resumed) = outcomes["phalanx"]
    assert [record["epoch"] for record in first if "epoch" in record] == [0, 0, 1, 1]
    assert [record["resumed_at"] for record in resumed if "resumed_at" in record] == [2, 2]
    assert [record["epoch"] for record in resumed if "epoch" in record] == [2, 2, 3, 3]
    assert outcomes["phalanx"] == outcomes["torchrun"]  # every loss and every weight, to the last bit


PROBE = """
import json, os, sys
names = {names!r}
sys.stdout.write(json.dumps({{name: os.environ.get(name) for name in names}}) + "\\n")
"""


def test_every_variable_torchrun_sets_is_set_alike(tmp_path):
    script = _write(tmp_path, "probe.py", PROBE.format(names=TORCHRUN_VARIABLES))
    options = ["--standalone", "--nproc-per-node", "2", "--role", "trainer", "--max-restarts", "1", script]
    ours = phalanx_run("--no-prefix", *options, cwd=tmp_path)
    theirs = torchrun(*options, cwd=tmp_path)
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    ours, theirs = _records(ours.stdout), _records(theirs.stdout)
    assert len(theirs) == 2 and all(value is not None for record in theirs for value in record.values())
    for mine, torchruns in zip(ours, theirs, strict=True):
        missing = [name for name in TORCHRUN_VARIABLES if mine[name] is None]
        assert not missing, f"not set under phalanx run: {missing}"
        assert {name: mine[name] for name in TORCHRUN_VARIABLES if name not in DIFFERENT_BY_NATURE} == {
            name: torchruns[name] for name in TORCHRUN_VARIABLES if name not in DIFFERENT_BY_NATURE
        }
    assert ours[0]["TORCHELASTIC_RUN_ID"] == ours[1]["TORCHELASTIC_RUN_ID"] != "none"  # --standalone: a fresh id


def test_omp_num_threads_is_one_with_torchruns_notice_when_unset(tmp_path):
    script = _write(
        tmp_path, "threads.py", "import os, torch\nprint(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())\n"
    )
    result = phalanx_run("--nproc-per-node", "2", script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[rank 0] 1 1" in result.stdout and "[rank 1] 1 1" in result.stdout
    assert "Setting OMP_NUM_THREADS environment variable for each process to be 1 in default" in result.stderr


def test_omp_num_threads_given_is_kept_without_a_notice(tmp_path):
    script = _write(
        tmp_path, "threads.py", "import os, torch\nprint(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())\n"
    )
    result = phalanx_run("--nproc-per-node", "2", script, cwd=tmp_path, OMP_NUM_THREADS="2")
    assert result.returncode == 0, result.stderr
    assert "[rank 1] 2 2" in result.stdout
    assert "Setting OMP_NUM_THREADS" not in result.stderr


HELPERS_ONLY = """
import torch
import torch.distributed as dist
import phalanx as px

assert not dist.is_initialized()  # phalanx run makes no group before one is needed
total = px.all_reduce(torch.ones(1), op="sum").item()
model = px.prepare_model(torch.nn.Linear(2, 1))
print(f"rank {px.get_rank()} of {px.get_world_size()} total={total} ddp={type(model).__name__}")
"""


def test_a_script_that_uses_only_phalanxs_helpers_joins_the_ranks_when_it_needs_them(tmp_path):
    result = phalanx_run("--nproc-per-node", "2", _write(tmp_path, "helpers.py", HELPERS_ONLY), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] rank {rank} of 2 total=2.0 ddp=DistributedDataParallel" in result.stdout


LAUNCH_INSIDE = """
import os
import phalanx as px

def work(scale):
    return (px.get_rank(), os.getpid(), scale)

values = px.launch(work, 10, platform=px.Platform(device="cpu", n_procs=8))
print("values", [(rank, scale) for rank, _, scale in values], "mine", values[px.get_rank()][1] == os.getpid())
"""


def test_launch_inside_a_script_runs_on_the_ranks_phalanx_run_started(tmp_path):
    result = phalanx_run("--nproc-per-node", "2", _write(tmp_path, "launching.py", LAUNCH_INSIDE), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):  # two ranks, not eight: launch joined them, and each ran work itself
        assert f"[rank {rank}] values [(0, 10), (1, 10)] mine True" in result.stdout


def test_module_switch_in_both_spellings(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "__init__.py").write_text("")
    (tmp_path / "jobs" / "hello.py").write_text("import os, sys\nprint('module', os.environ['RANK'], sys.argv[1:])\n")
    result = phalanx_run("--module", "--nproc-per-node", "2", "jobs.hello", "--flag", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[rank 1] module 1 ['--flag']" in result.stdout


# -- --no-python ------------------------------------------------------------------------------------

EXECUTABLE = """#!/bin/sh
echo "rank $RANK of $WORLD_SIZE, local $LOCAL_RANK, args $*"
if [ "$RANK" = 1 ] && [ "$1" = fail ]; then echo "rank 1 gives up" >&2; exit 3; fi
"""


@pytest.fixture
def executable(tmp_path) -> str:
    path = Path(_write(tmp_path, "job.sh", EXECUTABLE))
    path.chmod(0o755)
    return str(path)


def test_no_python_runs_the_executable_in_every_rank_with_its_environment(tmp_path, executable):
    result = phalanx_run("--no-python", "--nproc-per-node", "2", executable, "go", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[rank 0] rank 0 of 2, local 0, args go" in result.stdout
    assert "[rank 1] rank 1 of 2, local 1, args go" in result.stdout


def test_no_python_non_zero_exit_is_the_ranks_failure(tmp_path, executable):
    result = phalanx_run("--no_python", "--nproc-per-node", "2", executable, "fail", cwd=tmp_path)
    assert result.returncode == 1
    assert "[rank 1] rank 1 gives up" in result.stderr
    assert "rank 1 raised CalledProcessError" in result.stderr and "exit status 3" in result.stderr


# -- log files --------------------------------------------------------------------------------------

LOGGING = """
import os, sys

rank, attempt = os.environ["LOCAL_RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
print(f"out {rank} attempt {attempt} of {os.environ['TORCHELASTIC_MAX_RESTARTS']}", flush=True)
print(f"apple {rank}", flush=True)
print(f"pear {rank}", flush=True)
print(f"err {rank}", file=sys.stderr, flush=True)
if attempt == "0":  # rank 1 fails the first attempt once rank 0's lines are out (a FIFO meets them)
    if rank == "0":
        with open("lines-out.fifo", "w") as fifo:
            fifo.write("out")
    else:
        with open("lines-out.fifo") as fifo:
            fifo.read()
        sys.exit(1)
"""


def _log_tree(log_dir: Path) -> dict[str, str]:
    """Every file under the log folder by its path, the run folder's random part left out, with its text.

    The lines of the filtered files lose the launcher's prefix ([default0]: for torchrun, [rank 0] here).
    """
    (run_folder,) = log_dir.iterdir()
    tree = {}
    for path in sorted(run_folder.rglob("*")):
        if path.is_file():
            text = path.read_text()
            if path.name.startswith("filtered_"):
                text = "".join(sorted(re.sub(r"^\[[^\]]*\]:? ?", "", line) for line in text.splitlines(True)))
            tree[str(path.relative_to(run_folder))] = text
    assert run_folder.name.startswith("job_")
    return tree


def test_log_files_are_laid_out_as_torchrun_lays_them_out(tmp_path):
    trees = {}
    for launcher, start in [("phalanx", phalanx_run), ("torchrun", torchrun)]:
        folder = tmp_path / launcher
        folder.mkdir()
        script = _write(folder, "logging_job.py", LOGGING)
        os.mkfifo(folder / "lines-out.fifo")
        options = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", "job"]
        options += ["--nproc-per-node", "2", "--max-restarts", "1", "--log-dir", str(folder / "logs")]
        options += ["--tee", "0:3", "--redirects", "1:1", "--duplicate-stdout-filters", "apple"]
        result = start(*options, script, cwd=folder)
        assert result.returncode == 0, result.stderr
        trees[launcher] = _log_tree(folder / "logs")
        if launcher == "phalanx":
            assert "[rank 0] out 0 attempt 1 of 1" in result.stdout  # tee'd: in the file and on the console
            assert "out 1" not in result.stdout  # redirected: in the file only
            assert "[rank 1] err 1" in result.stderr  # rank 1's stderr is neither
    assert trees["phalanx"] == trees["torchrun"]
    assert trees["phalanx"]["attempt_1/1/stdout.log"] == "out 1 attempt 1 of 1\napple 1\npear 1\n"
    assert trees["phalanx"]["attempt_0/filtered_stdout.log"] == "apple 0\n"


def test_log_files_are_new_files_with_the_users_umask(tmp_path):
    script = _write(tmp_path, "hello.py", "print('hello')\n")
    command = [sys.executable, "-m", "phalanx", "run", "--redirects", "3", "--log-dir", str(tmp_path / "logs"), script]
    subprocess.run(command, cwd=tmp_path, check=True, timeout=100, env=_environment(), umask=0o027)
    (run_folder,) = (tmp_path / "logs").iterdir()
    assert (run_folder / "attempt_0" / "0" / "stdout.log").read_text() == "hello\n"
    for name in ("stdout.log", "stderr.log"):
        assert (run_folder / "attempt_0" / "0" / name).stat().st_mode & 0o777 == 0o640


def test_local_ranks_filter_shows_only_those_ranks_on_the_console(tmp_path):
    script = _write(tmp_path, "hello.py", "import os, sys\nprint('hello', os.environ['RANK'])\n")
    result = phalanx_run("--local-ranks-filter", "1", "--nproc-per-node", "2", script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[rank 1] hello 1" in result.stdout and "hello 0" not in result.stdout


# -- signals ----------------------------------------------------------------------------------------

WAITING = """
import os, signal, sys, threading
if "--ignore-sigterm" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "--exit-on-sigterm" in sys.argv:  # a script that ends itself, with a failure, on the signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
print("ready", os.getpid(), flush=True)
threading.Event().wait()
"""


def _start_waiting_ranks(
    tmp_path: Path, *script_arguments: str, options: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, list[int]]:
    """`phalanx run` with two ranks that wait forever, once both said they are ready; their pids."""
    script = _write(tmp_path, "waiting.py", WAITING)
    command = [sys.executable, "-m", "phalanx", "run", *options, "--nproc-per-node", "2", script, *script_arguments]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment())
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    pids: list[int] = []
    try:
        while len(pids) < 2:
            found = re.search(r"ready (\d+)", lines.get(timeout=60))
            if found:
                pids.append(int(found.group(1)))
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process, pids


def _seconds_until_gone(pids: list[int], bound: float) -> float:
    """Seconds until every process in `pids` has ended (pidfds become readable), at most `bound`."""
    start = time.monotonic()
    descriptors = [os.pidfd_open(pid) for pid in pids]
    try:
        left = set(descriptors)
        while left and time.monotonic() - start < bound:
            ready, _, _ = select.select(list(left), [], [], bound)
            left -= set(ready)
        return time.monotonic() - start
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfds to see the ranks end")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_reaches_every_rank_and_the_exit_code_says_which(tmp_path, signum):
    process, pids = _start_waiting_ranks(tmp_path)
    try:
        os.kill(process.pid, signum)
        gone_after = _seconds_until_gone(pids, bound=5)
        code = process.wait(timeout=30)
        assert not [pid for pid in pids if _alive(pid)]
        assert gone_after < 1.0
        assert code == 128 + signum
        assert f"phalanx run: received {signum.name}; every rank was stopped" in process.stderr.read()
    finally:
        process.kill()
        process.wait()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfds to see the ranks end")
def test_ranks_that_ignore_sigterm_are_killed_within_a_second(tmp_path):
    process, pids = _start_waiting_ranks(tmp_path, "--ignore-sigterm")
    try:
        os.kill(process.pid, signal.SIGTERM)
        gone_after = _seconds_until_gone(pids, bound=5)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
        assert not [pid for pid in pids if _alive(pid)]
        assert gone_after < 1.0
    finally:
        process.kill()
        process.wait()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _stop_with(process: subprocess.Popen, pids: list[int], signum: int) -> tuple[int, str]:
    """Send `signum` to `phalanx run`; its exit code and stderr, once every rank is gone (none is left)."""
    try:
        os.kill(process.pid, signum)
        code = process.wait(timeout=30)
        assert not [pid for pid in pids if _alive(pid)]
        return code, process.stderr.read()
    finally:
        process.kill()
        process.wait()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_never_restarts_the_ranks(tmp_path, signum):
    process, pids = _start_waiting_ranks(tmp_path, options=("--max-restarts", "2"))
    code, stderr = _stop_with(process, pids, signum)
    assert code == 128 + signum, stderr
    assert "restarting" not in stderr


def test_a_rank_that_fails_on_the_signal_still_gives_the_signals_exit_code(tmp_path):
    process, pids = _start_waiting_ranks(tmp_path, "--exit-on-sigterm")
    code, stderr = _stop_with(process, pids, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stderr
    assert "phalanx run: received SIGTERM; every rank was stopped" in stderr
