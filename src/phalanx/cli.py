"""The `phalanx` command: `phalanx run` starts a script on N ranks, `phalanx env` reports the setup.

phalanx run --nproc-per-node 2 train.py --epochs 3
phalanx run --device gpu --distributed -m mypackage.train    # one rank per visible GPU
phalanx env
phalanx secret          # a new job secret, for PHALANX_JOB_SECRET on every node of one job
"""

from __future__ import annotations

import argparse
import os
import platform as python_platform
import runpy
import shutil
import subprocess
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

import phalanx
from phalanx import variables
from phalanx.arguments import add_platform_arguments
from phalanx.devices import available_device_types, usable_cores
from phalanx.environment import detect_environment
from phalanx.errors import PhalanxError, WorkerError
from phalanx.job_secret import new_secret
from phalanx.launch import launch
from phalanx.platform import Platform

__all__ = ["add_platform_arguments", "main", "platform_from_args"]


def platform_from_args(args: argparse.Namespace) -> Platform:
    """The `Platform` that the options of `add_platform_arguments` describe (`Platform.from_args`)."""
    return Platform.from_args(args)


def _run_main(target: str, is_module: bool, argv: list[str]) -> None:
    """In a rank: run the script (or module) as `__main__`, as `python script.py` would."""
    os.environ[variables.RUN] = "1"
    sys.argv = [target, *argv]
    try:
        if is_module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
    except SystemExit as done:
        if done.code not in (None, 0):
            raise


def _run(args: argparse.Namespace) -> int:
    if args.module is None and not args.script:
        print("phalanx run: error: give a script (train.py) or a module (-m package.module)", file=sys.stderr)
        return 2
    if args.module is not None:
        target, is_module, argv = args.module, True, args.script
    else:
        target, is_module, argv = args.script[0], False, args.script[1:]
        if not os.path.isfile(target):
            print(f"phalanx run: error: no such script: {target}", file=sys.stderr)
            return 2
    try:
        platform = platform_from_args(args)
        launch(_run_main, target, is_module, argv, platform=platform)
    except WorkerError as error:
        print(f"phalanx run: {error}", file=sys.stderr)
        return 1
    except PhalanxError as error:
        print(f"phalanx run: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("phalanx run: interrupted; every rank was stopped", file=sys.stderr)
        return 130
    return 0


def _command_version(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        return "not found"
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "not found"
    return output.strip().splitlines()[0] if output.strip() else "unknown"


def environment_report() -> str:
    """Versions, devices, backends and the detected cluster: what a bug report needs."""
    lines = [
        f"phalanx      {phalanx.__version__}",
        f"torch        {torch.__version__}",
        f"python       {sys.version.split()[0]} ({python_platform.platform()})",
        f"cuda         {torch.version.cuda or 'none (CPU build)'}",
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"gpus         {torch.cuda.device_count()}: {names}")
        nccl = torch.cuda.nccl.version() if dist.is_nccl_available() else None
        lines.append(f"nccl         {'.'.join(map(str, nccl)) if nccl else 'not available'}")
    backends = [name for name in ("gloo", "nccl", "mpi", "ucc", "xccl") if getattr(dist, f"is_{name}_available", None)]
    backends = [name for name in backends if getattr(dist, f"is_{name}_available")()]
    environment = detect_environment()
    lines += [
        f"devices      {', '.join(available_device_types())}",
        f"backends     {', '.join(backends) or 'none'}",
        f"mpi          {_command_version(['mpirun', '--version'])}",
        f"slurm        {_command_version(['sinfo', '--version'])}",
        f"cluster      {environment.describe() if environment else 'none detected: launch starts the ranks here'}",
        f"cpus         {usable_cores()}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phalanx", description="Run a PyTorch script on N ranks, anywhere.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,env,secret}")
    run = commands.add_parser(
        "run",
        help="run a script or module on every rank",
        description="Run a script's __main__ (or a module's, with -m) on every rank, with the process group "
        "set up and phalanx's helpers working; exits non-zero with the failing rank's traceback.",
        usage="phalanx run [options] (script.py | -m module) [script arguments]",
    )
    add_platform_arguments(run)
    run.add_argument("--no-prefix", action="store_true", help="do not prefix rank output with [rank k]")
    run.add_argument("--quiet", action="store_true", help="do not show the ranks' output")
    run.add_argument("-m", dest="module", default=None, metavar="module", help="run a module as __main__")
    run.add_argument("script", nargs=argparse.REMAINDER, help="the script and its arguments")
    commands.add_parser("env", help="print versions, devices, backends and the detected cluster")
    commands.add_parser(
        "secret",
        help="print a new job secret (64 hex digits) for PHALANX_JOB_SECRET",
        description="Print a new job secret: give every process of one job the same one, e.g. "
        "`export PHALANX_JOB_SECRET=$(phalanx secret)` before starting the nodes. Everything the job's store "
        "carries is signed with it.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `phalanx` command."""
    args = build_parser().parse_args(argv)
    if args.command == "env":
        print(environment_report())
        return 0
    if args.command == "secret":
        print(new_secret().hex())
        return 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
