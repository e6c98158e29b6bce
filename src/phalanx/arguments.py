"""The platform's command-line options: added to a parser, and read back as `Platform` arguments.

`phalanx run` and a script's own parser (`phalanx.add_platform_arguments`) share them;
`Platform.from_args(args)` builds the platform from what they parsed. This module knows the
options and what they mean, not `Platform` itself, so that platform, cli and launch import it
without importing each other.
"""

from __future__ import annotations

import argparse
from typing import Any

from phalanx.devices import DEVICE_ALIASES, default_device_type
from phalanx.environment import detect_environment
from phalanx.errors import PlatformError

__all__ = ["add_platform_arguments", "platform_keywords"]

CLUSTER_CHOICES = ["auto", "local", "env", "slurm"]


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
    `Platform.from_args(args)`; `args.checkpoint` is left for the script to load. As with
    torchrun and pystematic, one process runs unless `--nproc-per-node` or `--distributed`
    asks for more.

    Example::

        parser = argparse.ArgumentParser()
        px.add_platform_arguments(parser)
        args = parser.parse_args()
        px.launch(train, args, platform=px.Platform.from_args(args))
    """
    group = parser.add_argument_group("platform", "where and how the ranks run (see phalanx.Platform)")
    group.add_argument(
        "--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", type=_positive, default=None,
        help="processes (ranks) per node; default 1, or one per visible GPU with --distributed "
        "(under torchrun, srun or mpirun: the processes they started)",
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
        help="pystematic's switch: without --nproc-per-node, run one rank per visible GPU instead of one "
        "process; with --device cpu, give --nproc-per-node instead",
    )  # fmt: skip
    group.add_argument("--backend", default=None, help="process-group backend (default: the device's)")
    group.add_argument("--timeout", type=float, default=None, help="collective timeout in seconds")
    group.add_argument("--seed", type=int, default=None, help="seed every rank with this value")
    group.add_argument("--cluster", default="auto", choices=CLUSTER_CHOICES)
    group.add_argument("--checkpoint", default=None, help="a checkpoint for the script to resume from")
    return group


def _processes_exist(cluster: str) -> bool:
    """Whether a launcher (torchrun, srun, mpirun) started the ranks already and so chose their count."""
    return cluster == "env" or (cluster == "auto" and detect_environment() is not None)


def _default_n_procs(device: str, cluster: str, distributed: bool) -> int | None:
    """Processes per node when --nproc-per-node is not given; None takes Platform's default."""
    if _processes_exist(cluster):
        return None
    if not distributed:
        return 1  # torchrun's and pystematic's default: one process
    name = DEVICE_ALIASES.get(device.strip().lower(), device.strip().lower())
    if name == "auto" and cluster != "slurm":  # a SLURM node's devices are not this machine's
        name = default_device_type()
    if name == "cpu":
        raise PlatformError(
            "n_procs",
            None,
            "--distributed without --nproc-per-node starts one rank per visible GPU, and the device is cpu",
            "Give --nproc-per-node N to run N CPU ranks, or --device gpu where GPUs are visible.",
        )
    return None  # Platform's default for an accelerator: one rank per visible device


def platform_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The `Platform` keyword arguments that the options of `add_platform_arguments` describe.

    Raises `PlatformError` for `--distributed` on cpu without `--nproc-per-node`.
    """
    device = args.device or ("cuda" if getattr(args, "cuda", False) else "auto")
    n_procs = args.nproc_per_node
    if n_procs is None:
        n_procs = _default_n_procs(device, args.cluster, getattr(args, "distributed", False))
    return {
        "device": device,
        "n_procs": n_procs,
        "n_nodes": args.nnodes,
        "node_rank": args.node_rank,
        "master_addr": args.master_addr,
        "master_port": args.master_port,
        "backend": args.backend,
        "timeout": args.timeout,
        "seed": args.seed,
        "cluster": args.cluster,
        "console_logs": not getattr(args, "quiet", False),
        "rank_prefix": not getattr(args, "no_prefix", False),
    }
