"""The `phalanx` command: `phalanx run` starts a script on N ranks, `phalanx env` reports the setup.

phalanx run --nproc-per-node 2 train.py --epochs 3
phalanx run --device gpu -m mypackage.train
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
from typing import Any

from phalanx import variables
from phalanx.job_secret import new_secret

__all__ = ["add_platform_arguments", "main", "platform_from_args"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_platform_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the platform options (torchrun's and pystematic's names) to a script's own parser.

    Both spellings work (`--nproc-per-node` and `--nproc_per_node`). Build the platform with
    `Platform.from_args(args)`; `args.checkpoint` is left for the script to load.

    Example::

        parser = argparse.ArgumentParser()
        px.add_platform_arguments(parser)
        args = parser.parse_args()
        px.launch(train, args, platform=px.Platform.from_args(args))
    """
    group = parser.add_argument_group("platform", "where and how the ranks run (see phalanx.Platform)")
    group.add_argument(
        "--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", type=_positive, default=None,
        help="processes (ranks) per node; default: every visible GPU for gpu, else 1",
    )  # fmt: skip
    group.add_argument("--nnodes", type=_positive, default=1, help="number of nodes (default 1)")
    group.add_argument(
        "--node-rank", "--node_rank", dest="node_rank", type=int, default=0, help="this node's index (default 0)"
    )
    group.add_argument(
        "--master-addr", "--master_addr", dest="master_addr", default="127.0.0.1",
        help="node 0's address, where the ranks meet (default 127.0.0.1)",
    )  # fmt: skip
    group.add_argument(
        "--master-port", "--master_port", dest="master_port", type=int, default=None,
        help="port on node 0 (default: a free one; required with --nnodes > 1)",
    )  # fmt: skip
    group.add_argument("--device", default=None, help="auto, cpu, gpu/cuda, mps, xpu (default auto)")
    group.add_argument("--cuda", action="store_true", help="pystematic's switch: same as --device cuda")
    group.add_argument(
        "--distributed", action="store_true",
        help="pystematic's switch: one rank per visible GPU unless --nproc-per-node says otherwise",
    )  # fmt: skip
    group.add_argument("--backend", default=None, help="process-group backend (default: the device's)")
    group.add_argument("--timeout", type=float, default=None, help="collective timeout in seconds")
    group.add_argument("--seed", type=int, default=None, help="seed every rank with this value")
    group.add_argument("--cluster", default="auto", choices=["auto", "local", "env", "slurm"])
    group.add_argument("--checkpoint", default=None, help="a checkpoint for the script to resume from")
    return group


def platform_from_args(args: argparse.Namespace) -> Any:
    """The `Platform` that the options of `add_platform_arguments` describe."""
    from phalanx.platform import Platform

    device = args.device or ("cuda" if getattr(args, "cuda", False) else "auto")
    n_procs = args.nproc_per_node
    if n_procs is None and not getattr(args, "distributed", False) and device in ("auto", "cuda", "gpu"):
        n_procs = None  # every visible GPU for cuda, 1 otherwise: Platform's own default
    return Platform(
        device=device,
        n_procs=n_procs,
        n_nodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        backend=args.backend,
        timeout=args.timeout,
        seed=args.seed,
        cluster=args.cluster,
        console_logs=not getattr(args, "quiet", False),
        rank_prefix=not getattr(args, "no_prefix", False),
    )


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
    from phalanx.errors import PhalanxError, WorkerError
    from phalanx.launch import launch

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
    import torch
    import torch.distributed as dist

    import phalanx
    from phalanx.environment import detect_environment
    from phalanx.platform import available_device_types

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
        f"cpus         {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}",
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
