"""The `phalanx` command: `phalanx run` starts a script on N ranks, `phalanx env` reports the setup.

phalanx run --nproc-per-node 2 train.py --epochs 3
phalanx run --standalone --nproc-per-node 4 train.py    # torchrun's command line: scripts for torchrun run unchanged
phalanx run --device gpu --distributed -m mypackage.train    # one rank per visible GPU
phalanx env
phalanx secret          # a new job secret, for PHALANX_JOB_SECRET on every node of one job
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import platform as python_platform
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from types import FrameType

import torch
import torch.distributed as dist

import phalanx
from phalanx import variables
from phalanx.arguments import (
    OptionError,
    add_platform_arguments,
    add_torchrun_arguments,
    check_torchrun_options,
    torchrun_environment_defaults,
)
from phalanx.devices import available_device_types, usable_cores
from phalanx.environment import detect_environment
from phalanx.errors import LaunchError, PhalanxError, WorkerError
from phalanx.job_secret import new_secret
from phalanx.launch import run_job
from phalanx.platform import Platform, RankLogs
from phalanx.runners.output import new_run_folder
from phalanx.signals import FORWARDED_SIGNALS, exit_code_for, signal_of, stop_signals_raise

__all__ = ["add_platform_arguments", "build_parser", "main", "platform_from_args"]

# torchrun's notice when it sets OMP_NUM_THREADS for the workers (torch/distributed/run.py).
_OMP_NOTICE = (
    "\n*****************************************\n"
    "Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your system "
    "being overloaded, please further tune the variable for optimal performance in your application as needed. "
    "\n*****************************************"
)
SIGNALS_TO_HANDLE = variables.TORCHELASTIC_SIGNALS_TO_HANDLE  # torchrun's agent sets it in its own environment


def platform_from_args(args: argparse.Namespace) -> Platform:
    """The `Platform` that the options of `add_platform_arguments` describe (`Platform.from_args`)."""
    return Platform.from_args(args)


def _run_main(target: str, mode: str, argv: list[str]) -> None:
    """In a rank: run the script, module or executable (`mode`) as `python script.py` (or the shell) would."""
    os.environ[variables.RUN] = "1"
    try:
        if mode == "executable":
            # The rank's environment, descriptors and process group: its stop signal reaches this too.
            completed = subprocess.run([target, *argv])
            if completed.returncode != 0:
                raise subprocess.CalledProcessError(completed.returncode, [target, *argv])
            return
        sys.argv = [target, *argv]
        if mode == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
    except SystemExit as done:
        if done.code not in (None, 0):
            raise
    except KeyboardInterrupt:
        _end_by_signal(signal.SIGINT)


def _end_by_signal(signum: int) -> None:
    """End as Python ends on an uncaught Ctrl-C: killed by the signal, so the caller sees which.

    phalanx run forwards SIGINT to the ranks; a rank that ends so was stopped, it did not fail.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    raise KeyboardInterrupt  # not reached: the signal ends the process


def _note_signal(received: list[int], handler, signum: int, frame: FrameType | None) -> None:
    received.append(signum)
    handler(signum, frame)


@contextlib.contextmanager
def _stop_signals_noted() -> Iterator[list[int]]:
    """`stop_signals_raise()`, keeping the signals that came (a rank may fail on one instead of stopping)."""
    received: list[int] = []
    with stop_signals_raise():
        if threading.current_thread() is threading.main_thread():
            for signum in FORWARDED_SIGNALS:
                signal.signal(signum, functools.partial(_note_signal, received, signal.getsignal(signum)))
        yield received


def _target(args: argparse.Namespace) -> tuple[str, str, list[str]] | str:
    """The target, how it runs ("script", "module" or "executable") and its arguments; or what is wrong."""
    if not args.script:
        return "give a script (train.py) or a module (-m package.module)"
    target, argv = args.script[0], args.script[1:]
    if args.module:
        return target, "module", argv
    if args.no_python and not args.run_path:  # torchrun: --run-path wins over --no-python
        if shutil.which(target) is None:
            return f"no such executable: {target} (a path, or a command on PATH)"
        return target, "executable", argv
    if not os.path.isfile(target):
        return f"no such script: {target}"
    return target, "script", argv


def _rank_logs(args: argparse.Namespace, run_id: str) -> RankLogs:
    """torchrun's log options as `Platform.rank_logs`, with the run's folder made now when files are asked for."""
    files = args.log_dir is not None or args.redirects != "0" or args.tee != "0"
    return RankLogs(
        folder=new_run_folder(args.log_dir, run_id) if files else None,
        redirects=args.redirects,
        tee=args.tee,
        console_ranks=args.local_ranks_filter,
        stdout_filters=args.duplicate_stdout_filters,
        stderr_filters=args.duplicate_stderr_filters,
    )


def _starts_ranks_here(platform: Platform) -> bool:
    """Whether phalanx starts the ranks on this machine (not SLURM, not a launcher's processes)."""
    return platform.cluster == "local" or (platform.cluster == "auto" and detect_environment() is None)


def _run(args: argparse.Namespace, run_parser: argparse.ArgumentParser) -> int:
    found = _target(args)
    if isinstance(found, str):
        print(f"phalanx run: error: {found}", file=sys.stderr)
        return 2
    target, mode, argv = found
    try:
        check_torchrun_options(args)
        platform = platform_from_args(args)
        run_id = str(uuid.uuid4()) if args.standalone else args.rdzv_id  # torchrun's --standalone does so
        platform = dataclasses.replace(platform, rank_logs=_rank_logs(args, run_id))
        rank_variables = {SIGNALS_TO_HANDLE: args.signals_to_handle}
        if (
            variables.OMP_NUM_THREADS not in os.environ
            and _starts_ranks_here(platform)
            and platform.resolve().n_procs > 1
        ):
            print(_OMP_NOTICE, file=sys.stderr, flush=True)  # torchrun's notice, and its choice
            rank_variables[variables.OMP_NUM_THREADS] = "1"
    except OptionError as error:
        run_parser.error(str(error))
    except PhalanxError as error:
        print(f"phalanx run: error: {error}", file=sys.stderr)
        return 2
    received: list[int] = []
    try:
        with _stop_signals_noted() as received:
            run_job(
                _run_main,
                (target, mode, argv),
                {},
                platform,
                rank_variables=rank_variables,
                torchrun_style=True,
                role=args.role,
                run_id=run_id,
            )
    except KeyboardInterrupt as interruption:
        return _stopped(signal_of(interruption))
    except (WorkerError, LaunchError) as error:
        if received:  # a rank that handles the signal itself may fail on it: the signal is what happened
            return _stopped(received[0])
        print(f"phalanx run: {error}", file=sys.stderr)
        return 1
    except PhalanxError as error:
        print(f"phalanx run: error: {error}", file=sys.stderr)
        return 2
    return 0


def _stopped(signum: int) -> int:
    print(f"phalanx run: received {signal.Signals(signum).name}; every rank was stopped", file=sys.stderr)
    return exit_code_for(signum)


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


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: an option it does not know is reported under its own usage, not phalanx's."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="phalanx", description="Run a PyTorch script on N ranks, anywhere.")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{run,env,secret}", parser_class=_CommandParser
    )
    run = commands.add_parser(
        "run",
        help="run a script or module on every rank",
        description="Run a script's __main__ (or a module's, with -m) on every rank, as torchrun does: with "
        "torchrun's variables set and its command line, so that scripts written for torchrun run unchanged; "
        "phalanx's helpers work too. Exits non-zero with the failing rank's traceback, and with 128 + n "
        "after signal n (SIGTERM, SIGINT, SIGHUP), which every rank gets too.",
        usage="phalanx run [options] (script.py | -m module | --no-python executable) [script arguments]",
    )
    add_platform_arguments(run)
    add_torchrun_arguments(run)
    own = run.add_argument_group("phalanx run's own options")
    own.add_argument("--no-prefix", action="store_true", help="do not prefix rank output with [rank k]")
    own.add_argument("--quiet", action="store_true", help="do not show the ranks' output")
    run.add_argument("script", nargs=argparse.REMAINDER, help="the script (or module) and its arguments")
    run.set_defaults(node_rank=None)  # given or not: torchrun's c10d numbers the nodes itself
    torchrun_environment_defaults(run, os.environ)
    commands.add_parser("env", help="print versions, devices, backends and the detected cluster")
    commands.add_parser(
        "secret",
        help="print a new job secret (64 hex digits) for PHALANX_JOB_SECRET",
        description="Print a new job secret: give every process of one job the same one, e.g. "
        "`export PHALANX_JOB_SECRET=$(phalanx secret)` before starting the nodes. Everything the job's store "
        "carries is signed with it.",
    )
    return parser, run


def build_parser() -> argparse.ArgumentParser:
    """The `phalanx` command's parser (`run`, `env`, `secret`)."""
    return _build_parsers()[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `phalanx` command."""
    parser, run_parser = _build_parsers()
    args = parser.parse_args(argv)
    if args.command == "env":
        print(environment_report())
        return 0
    if args.command == "secret":
        print(new_secret().hex())
        return 0
    return _run(args, run_parser)


if __name__ == "__main__":
    sys.exit(main())
