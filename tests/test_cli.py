"""The `phalanx` command, through a real subprocess: run, env, help, flags, exit codes."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

import pytest

import phalanx as px

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
