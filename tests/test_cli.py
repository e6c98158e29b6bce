"""The `phalanx` command, through a real subprocess: run, env, help, flags, exit codes."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import phalanx as px
from phalanx import arguments, cli

SOURCE = Path(px.__file__).resolve().parent

pytestmark = pytest.mark.timeout(120)

SCRIPT = """
import sys, torch, phalanx as px

total = px.all_reduce(torch.ones(1), op="sum").item()
print(f"rank {px.get_rank()} of {px.get_world_size()} args={sys.argv[1:]} total={total}")
print("joined", px.launch(lambda: px.get_rank() * 10))
if "--fail" in sys.argv and px.get_rank() == 1:
    raise RuntimeError("rank 1 cannot go on")
if "--exit" in sys.argv:
    sys.exit(int(sys.argv[-1]))
"""


def phalanx(*arguments: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "phalanx", *arguments], capture_output=True, text=True, timeout=100, cwd=cwd
    )


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(SCRIPT))
    return str(path)


def test_run_starts_the_script_on_every_rank_with_its_arguments(script):
    result = phalanx("run", "--nproc-per-node", "2", "--device", "cpu", script, "--epochs", "3")
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        assert f"[rank {rank}] rank {rank} of 2 args=['--epochs', '3'] total=2.0" in result.stdout
        assert f"[rank {rank}] joined [0, 10]" in result.stdout  # launch inside a rank joins the group


def test_run_module_with_dash_m(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "__init__.py").write_text("")
    (tmp_path / "jobs" / "hello.py").write_text("import phalanx as px\nprint('module rank', px.get_rank())\n")
    result = phalanx("run", "--nproc_per_node", "2", "-m", "jobs.hello", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[rank 1] module rank 1" in result.stdout


def test_failing_rank_gives_a_non_zero_exit_and_its_traceback(script):
    result = phalanx("run", "--nproc-per-node", "2", script, "--fail")
    assert result.returncode == 1
    assert "rank 1 raised RuntimeError: rank 1 cannot go on" in result.stderr
    assert 'raise RuntimeError("rank 1 cannot go on")' in result.stderr


@pytest.mark.parametrize(("code", "expected"), [("0", 0), ("3", 1)])
def test_sys_exit_zero_is_success_and_non_zero_is_failure(script, code, expected):
    assert phalanx("run", "--nproc-per-node", "2", script, "--exit", code).returncode == expected


def test_help_documents_every_flag():
    result = phalanx("run", "--help")
    assert result.returncode == 0
    flags = ["--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--device", "--cuda"]
    flags += ["--distributed", "--backend", "--timeout", "--seed", "--cluster", "--checkpoint", "--no-prefix", "-m"]
    for flag in flags:
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["run", "--nproc-per-node", "zero", "x.py"], "argument --nproc-per-node"),
        (["run", "--nproc-per-node", "0", "x.py"], "must be at least 1"),
        (["run", "--cluster", "moon", "x.py"], "argument --cluster"),
        (["launch"], "invalid choice"),
    ],
)
def test_bad_flags_give_an_argparse_error_naming_the_flag(arguments, message):
    result = phalanx(*arguments)
    assert result.returncode == 2 and message in result.stderr


def test_bad_platform_value_and_missing_script_are_reported():
    result = phalanx("run", "--device", "tpu-unknown", "x.py")
    assert result.returncode == 2 and "no such script" in result.stderr
    result = phalanx("run")
    assert result.returncode == 2 and "give a script" in result.stderr


def test_env_reports_versions_devices_and_cluster():
    result = phalanx("env")
    assert result.returncode == 0
    for key in ("phalanx", "torch", "python", "cuda", "devices", "backends", "mpi", "slurm", "cluster"):
        assert any(line.startswith(key) for line in result.stdout.splitlines()), key


def test_platform_arguments_for_a_users_own_parser():
    parser = argparse.ArgumentParser()
    px.add_platform_arguments(parser)
    options = ["--nproc_per_node", "3", "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.5"]
    options += ["--master_port", "29411", "--device", "cpu", "--checkpoint", "ckpt.pt", "--seed", "4"]
    args = parser.parse_args(options)
    platform = px.Platform.from_args(args)
    assert (platform.n_procs, platform.n_nodes, platform.node_rank) == (3, 2, 1)
    assert (platform.master_addr, platform.master_port, platform.seed) == ("10.0.0.5", 29411, 4)
    assert args.checkpoint == "ckpt.pt"


def test_platform_from_args_runs_a_launch():
    parser = argparse.ArgumentParser()
    px.add_platform_arguments(parser)
    args = parser.parse_args(["--nproc-per-node", "2", "--device", "cpu"])
    assert px.launch(px.get_rank, platform=px.Platform.from_args(args)) == [0, 1]


# -- --distributed: pystematic's switch -----------------------------------------------------------


def _parsed(*options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    px.add_platform_arguments(parser)
    return parser.parse_args(list(options))


@pytest.fixture
def four_gpus(monkeypatch):
    """Make torch report four CUDA devices and nccl (nothing touches them: platforms are only resolved)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)


def test_without_distributed_or_a_count_one_process_runs_as_with_torchrun_and_pystematic(four_gpus):
    assert px.Platform.from_args(_parsed("--device", "gpu")).resolve().n_procs == 1
    assert px.Platform.from_args(_parsed()).resolve().n_procs == 1  # auto: cuda here


def test_distributed_without_a_count_runs_one_rank_per_visible_gpu(four_gpus):
    assert px.Platform.from_args(_parsed("--distributed", "--device", "gpu")).resolve().n_procs == 4
    assert px.Platform.from_args(_parsed("--distributed", "--cuda")).resolve().n_procs == 4
    assert px.Platform.from_args(_parsed("--distributed")).resolve().n_procs == 4  # auto: cuda here


def test_nproc_per_node_wins_with_or_without_distributed(four_gpus):
    assert px.Platform.from_args(_parsed("--distributed", "--nproc-per-node", "2", "--device", "gpu")).n_procs == 2
    assert px.Platform.from_args(_parsed("--nproc-per-node", "3", "--device", "cpu")).n_procs == 3


def test_distributed_on_cpu_without_a_count_is_refused_naming_the_fix():
    with pytest.raises(px.PlatformError, match=r"--distributed.*cpu.*Give --nproc-per-node N"):
        px.Platform.from_args(_parsed("--distributed", "--device", "cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto means cpu only on a machine without a GPU")
def test_distributed_where_auto_means_cpu_is_refused_too():
    with pytest.raises(px.PlatformError, match="--nproc-per-node"):
        px.Platform.from_args(_parsed("--distributed"))


def test_phalanx_run_distributed_on_cpu_exits_2_with_the_fix(script):
    result = phalanx("run", "--distributed", "--device", "cpu", script)
    assert result.returncode == 2
    assert "--distributed" in result.stderr and "Give --nproc-per-node N" in result.stderr


def test_under_a_launcher_its_process_count_stands(monkeypatch):
    for name, value in {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    assert px.Platform.from_args(_parsed("--device", "cpu")).n_procs is None  # mpirun's 4, not 1
    assert px.Platform.from_args(_parsed("--distributed", "--device", "cpu")).n_procs is None
    assert px.Platform.from_args(_parsed("--cluster", "env", "--device", "cpu")).n_procs is None


def test_help_says_what_distributed_does():
    result = phalanx("run", "--help")
    assert "one rank per visible GPU instead of one" in " ".join(result.stdout.split())


# -- where the options live -----------------------------------------------------------------------


def test_the_options_and_platform_from_args_are_the_same_from_every_import_path():
    assert px.add_platform_arguments is cli.add_platform_arguments is arguments.add_platform_arguments
    args = _parsed("--nproc-per-node", "2", "--device", "cpu", "--seed", "3")
    assert cli.platform_from_args(args) == px.Platform.from_args(args)


@pytest.mark.parametrize("module", ["arguments", "cli", "devices", "dist", "platform", "wrapper"])
def test_phalanx_is_imported_at_module_top_only(module):
    """Imports inside functions hid an import circle (platform -> cli -> launch -> platform)."""
    tree = ast.parse((SOURCE / f"{module}.py").read_text())
    inner = [
        f"line {node.lineno}"
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
        if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("phalanx"))
        or (isinstance(node, ast.Import) and any(alias.name.startswith("phalanx") for alias in node.names))
    ]
    assert not inner, f"phalanx/{module}.py imports phalanx inside a function at {inner}"


def test_the_options_module_imports_neither_platform_nor_cli_nor_launch():
    tree = ast.parse((SOURCE / "arguments.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"phalanx.platform", "phalanx.cli", "phalanx.launch"}
