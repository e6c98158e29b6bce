"""The platform's command-line options: added to a parser, and read back as `Platform` arguments.

`phalanx run` and a script's own parser (`phalanx.add_platform_arguments`) share them;
`Platform.from_args(args)` builds the platform from what they parsed. `phalanx run` also
takes every option of torchrun (`add_torchrun_arguments`), with torchrun's meaning where
phalanx can give it and an `OptionError` that says what to use instead where it cannot.
This module knows the options and what they mean, not `Platform` itself, so that platform,
cli and launch import it without importing each other.
"""

from __future__ import annotations

import argparse
import re
import signal
from collections.abc import Mapping
from typing import Any

import torch

from phalanx.devices import DEVICE_ALIASES, default_device_type, device_count, is_available, usable_cores
from phalanx.environment import detect_environment
from phalanx.errors import PlatformError

__all__ = [
    "TORCHRUN_SIGNALS",
    "OptionError",
    "add_platform_arguments",
    "add_torchrun_arguments",
    "check_torchrun_options",
    "platform_keywords",
    "stream_bits",
    "torchrun_environment_defaults",
    "valid_streams",
]

CLUSTER_CHOICES = ["auto", "local", "env", "slurm"]
# torchrun's --nproc-per-node words (torch/distributed/run.py, determine_local_world_size).
PROCESS_COUNT_WORDS = ("auto", "cpu", "gpu", "xpu")
# What --signals-to-handle may name: torchrun's default list. phalanx forwards the first three.
TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
_C10D_DEFAULT_PORT = 29400  # torch's c10d rendezvous port when the endpoint gives none
# --rdzv-conf keys: those phalanx gives a meaning, and those of torchrun's elastic rendezvous
# that tune what phalanx does not have (joining nodes, heartbeats): accepted, without effect.
_RDZV_CONF_TIMEOUTS = ("join_timeout", "timeout")
_RDZV_CONF_WITHOUT_EFFECT = (
    "last_call_timeout",
    "close_timeout",
    "heartbeat_timeout",
    "keep_alive_interval",
    "keep_alive_max_attempt",
    "read_timeout",
    "use_libuv",
    "store_type",
)
_STREAMS = re.compile(r"[0-3]|\d+:[0-3](?:,\d+:[0-3])*")


class OptionError(PlatformError):
    """A command-line option that phalanx cannot honour; the message names it, says why and what to use.

    A `PlatformError` (bad configuration), spelled as the option was given: `phalanx run` prints
    it under its usage and exits with code 2.
    """

    def __init__(self, option: str, value: object, reason: str, fix: str = "") -> None:
        self.field = self.option = option
        self.value = value
        shown = option if value is None or value is True else f"{option} {value}"
        message = f"{shown}: {reason}."
        if fix:
            message += f" {fix}"
        ValueError.__init__(self, message)


def _whole(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
    return value


def _positive(text: str) -> int:
    return _whole(text, 1)


def _process_count(text: str) -> int | str:
    """--nproc-per-node: a count, or one of torchrun's words (counted when the platform is built)."""
    if text.strip().lower() in PROCESS_COUNT_WORDS:
        return text.strip().lower()
    if not text.strip().lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a whole number nor one of torchrun's words {', '.join(PROCESS_COUNT_WORDS)}"
        )
    return _positive(text)


def _node_count(text: str) -> int:
    """--nnodes: N, or torchrun's MIN:MAX with MIN equal to MAX; an elastic range is refused."""
    parts = text.split(":")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"{text!r} is neither N nor MIN:MAX")
    low, high = (_positive(part) for part in (parts[0], parts[-1]))
    if low > high:
        raise argparse.ArgumentTypeError(f"{text!r}: the minimum {low} is above the maximum {high}")
    if low != high:
        raise argparse.ArgumentTypeError(
            f"{text!r} asks for an elastic job, which phalanx does not run: its jobs keep the number of nodes "
            f"they start with. Give a fixed count, --nnodes {high} (or {high}:{high}); --max-restarts N starts "
            "failed ranks again"
        )
    return low


def _node_index(text: str) -> int:
    return _whole(text, 0)


def _streams(text: str) -> str:
    """--redirects and --tee: torchrun's "0".."3", or per local rank "0:3,1:1" (1 stdout, 2 stderr, 3 both)."""
    text = text.strip()
    if not valid_streams(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one of torchrun's forms: 0 (none), 1 (stdout), 2 (stderr), 3 (both), or per "
            "local rank, such as 0:3,1:1"
        )
    return text


def valid_streams(spec: str) -> bool:
    """Whether `spec` is one of torchrun's --redirects / --tee forms ("3", "0:3,1:1")."""
    return bool(_STREAMS.fullmatch(spec))


def stream_bits(spec: str, local_rank: int) -> int:
    """Which streams `spec` (torchrun's --redirects / --tee form) names for a local rank: 1 stdout, 2 stderr."""
    if ":" not in spec:
        return int(spec)
    pairs = dict(item.split(":") for item in spec.split(","))
    return int(pairs.get(str(local_rank), 0))


def _local_ranks(text: str) -> tuple[int, ...] | None:
    """--local-ranks-filter: comma-separated local ranks; empty: every rank."""
    if not text.strip():
        return None
    try:
        ranks = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of local ranks, such as 0,1"
        ) from None
    if any(rank < 0 for rank in ranks):
        raise argparse.ArgumentTypeError(f"{text!r}: local ranks are at least 0")
    return ranks


def _line_filters(text: str) -> tuple[str, ...]:
    """--duplicate-*-filters: comma-separated strings, a doubled comma standing for a comma (torchrun's)."""
    placeholder = "\0"
    return tuple(item.replace(placeholder, ",") for item in text.replace(",,", placeholder).split(",") if item)


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
        "--nproc-per-node", "--nproc_per_node", "--n-procs", "--n_procs", dest="nproc_per_node",
        type=_process_count, default=None, metavar="N",
        help="processes (ranks) per node, or torchrun's words: gpu (xpu) one per visible device, cpu one per "
        "usable core, auto one per accelerator, else one per core. Default 1, or one per visible GPU with "
        "--distributed (under torchrun, srun or mpirun: the processes they started)",
    )  # fmt: skip
    group.add_argument(
        "--nnodes", type=_node_count, default=1, metavar="N|N:N",
        help="number of nodes (default 1); torchrun's MIN:MAX only with MIN = MAX: phalanx jobs are not elastic",
    )  # fmt: skip
    group.add_argument(
        "--node-rank",
        "--node_rank",
        dest="node_rank",
        type=_node_index,
        default=0,
        help="this node's index (default 0)",
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


def add_torchrun_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add torchrun's own options (beyond the platform's), in both spellings, for `phalanx run`.

    Each has torchrun's meaning where phalanx can give it; `check_torchrun_options` refuses,
    saying what to use instead, those it cannot. `-m` is torchrun's switch: the target is a module.
    """
    group = parser.add_argument_group(
        "torchrun's options", "torchrun's command line, with torchrun's meaning (see docs/cli.md for each)"
    )
    add = group.add_argument
    add(
        "--standalone",
        action="store_true",
        help="one node, meeting on a free port of localhost with a fresh --rdzv-id (torchrun's meaning)",
    )
    add(
        "--rdzv-backend",
        "--rdzv_backend",
        dest="rdzv_backend",
        default="static",
        help="static (default) or c10d: node 0 hosts the store at --rdzv-endpoint; etcd is refused",
    )
    add(
        "--rdzv-endpoint",
        "--rdzv_endpoint",
        dest="rdzv_endpoint",
        default="",
        metavar="HOST[:PORT]",
        help="where the ranks meet, node 0's address (instead of --master-addr/--master-port)",
    )
    add(
        "--rdzv-id",
        "--rdzv_id",
        dest="rdzv_id",
        default="none",
        help="the job's id: TORCHELASTIC_RUN_ID in every rank, and the prefix of the log folder",
    )
    add(
        "--rdzv-conf",
        "--rdzv_conf",
        dest="rdzv_conf",
        default="",
        metavar="KEY=VALUE,...",
        help="join_timeout (or timeout): seconds a rank tries to reach the store; is_host: true on node 0 "
        "only; torchrun's elastic keys (last_call_timeout, heartbeat_timeout, ...) have no effect",
    )
    add(
        "--max-restarts",
        "--max_restarts",
        dest="max_restarts",
        type=_node_index,
        default=0,
        help="start every rank again after a failure, up to N times (Platform.max_restarts)",
    )
    add(
        "--monitor-interval",
        "--monitor_interval",
        dest="monitor_interval",
        type=float,
        default=0.1,
        help="accepted; phalanx does not poll: it sees each rank's exit and output as they happen",
    )
    add(
        "--start-method",
        "--start_method",
        dest="start_method",
        default="spawn",
        choices=["spawn", "fork", "forkserver"],
        help="accepted; phalanx forks every rank from a clean process taken when phalanx was imported "
        "(never a process that initialised CUDA), whichever is given",
    )
    add(
        "--event-log-handler",
        "--event_log_handler",
        dest="event_log_handler",
        default="null",
        help="null only: phalanx records no torchelastic events",
    )
    add("--role", default="default", help="the workers' role: ROLE_NAME in every rank")
    add(
        "-m",
        "--module",
        dest="module",
        action="store_true",
        help="the target is a module, run as `python -m module` would",
    )
    add(
        "--no-python",
        "--no_python",
        dest="no_python",
        action="store_true",
        help="the target is an executable: each rank runs it, with the rank's environment and output; a "
        "non-zero exit is the rank's failure",
    )
    add(
        "--run-path",
        "--run_path",
        dest="run_path",
        action="store_true",
        help="accepted: phalanx always runs the script in the rank's own interpreter (runpy.run_path)",
    )
    add(
        "--log-dir",
        "--log_dir",
        dest="log_dir",
        default=None,
        help="folder for the ranks' log files, laid out as torchrun does: "
        "LOG_DIR/<rdzv-id>_<random>/attempt_<n>/<local rank>/stdout.log, stderr.log",
    )
    add(
        "-r",
        "--redirects",
        dest="redirects",
        type=_streams,
        default="0",
        help="send streams to the log files only: 0 none, 1 stdout, 2 stderr, 3 both, or per local rank "
        "(0:3,1:1); without --log-dir, in a new temporary folder",
    )
    add(
        "-t",
        "--tee",
        dest="tee",
        type=_streams,
        default="0",
        help="write streams to the log files and the console (same forms as --redirects)",
    )
    add(
        "--local-ranks-filter",
        "--local_ranks_filter",
        dest="local_ranks_filter",
        type=_local_ranks,
        default=None,
        metavar="RANKS",
        help="show only these local ranks' output on the console (e.g. 0,1); the log files keep every rank's",
    )
    add(
        "--duplicate-stdout-filters",
        "--duplicate_stdout_filters",
        dest="duplicate_stdout_filters",
        type=_line_filters,
        default=(),
        metavar="FILTERS",
        help="copy the tee'd stdout lines that contain one of these (comma-separated) to "
        "attempt_<n>/filtered_stdout.log",
    )
    add(
        "--duplicate-stderr-filters",
        "--duplicate_stderr_filters",
        dest="duplicate_stderr_filters",
        type=_line_filters,
        default=(),
        metavar="FILTERS",
        help="the same for stderr: filtered_stderr.log",
    )
    add(
        "--local-addr",
        "--local_addr",
        dest="local_addr",
        default=None,
        help="refused: every node reaches node 0 at --master-addr (or --rdzv-endpoint's host)",
    )
    add(
        "--logs-specs",
        "--logs_specs",
        dest="logs_specs",
        default=None,
        help="refused: phalanx lays out the log files itself (--log-dir, --redirects, --tee)",
    )
    add(
        "--numa-binding",
        "--numa_binding",
        dest="numa_binding",
        default=None,
        help="refused: phalanx does not bind ranks to NUMA nodes (start it under numactl)",
    )
    add(
        "--signals-to-handle",
        "--signals_to_handle",
        dest="signals_to_handle",
        default=",".join(TORCHRUN_SIGNALS),
        help="phalanx forwards SIGTERM, SIGINT and SIGHUP to every rank and exits with 128 + the signal's "
        "number; SIGQUIT ends it with its ranks. Other signals are refused",
    )
    add(
        "--shutdown-timeout",
        "--shutdown_timeout",
        dest="shutdown_timeout",
        type=int,
        default=None,
        help="refused: after a signal phalanx gives the ranks 0.8 s, then kills them",
    )
    add(
        "--virtual-local-rank",
        "--virtual_local_rank",
        dest="virtual_local_rank",
        action="store_true",
        help="refused: each rank's LOCAL_RANK is its place on the node, and it sees every device",
    )
    return group


# torchrun's options whose default it reads from PET_<DEST> (torch.distributed.argparse_util).
_TORCHRUN_ENVIRONMENT_DESTS = (
    "nnodes", "nproc_per_node", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "rdzv_conf", "standalone",
    "max_restarts", "monitor_interval", "start_method", "event_log_handler", "role", "module", "no_python",
    "run_path", "log_dir", "redirects", "tee", "local_ranks_filter", "duplicate_stdout_filters",
    "duplicate_stderr_filters", "node_rank", "master_addr", "master_port", "local_addr", "signals_to_handle",
    "shutdown_timeout", "virtual_local_rank",
)  # fmt: skip


def torchrun_environment_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Take torchrun's `PET_<OPTION>` variables as the defaults of its options, as torchrun does.

    Kubeflow's PyTorchJob, for one, gives torchrun its options so (PET_NNODES, PET_NPROC_PER_NODE).
    A value is converted and checked like the option's own; a switch takes 0 or 1.
    """
    for action in parser._actions:
        for group_action in getattr(action, "_group_actions", [action]):
            name = f"PET_{group_action.dest.upper()}"
            if group_action.dest not in _TORCHRUN_ENVIRONMENT_DESTS or name not in environ:
                continue
            value = environ[name]
            if isinstance(group_action, argparse._StoreTrueAction):
                if value.strip() not in ("0", "1"):
                    parser.error(f"{name}={value!r}: torchrun's switches take 0 or 1 from the environment")
                group_action.default = value.strip() == "1"
            else:
                group_action.default = value  # a string: argparse converts it with the option's type


def _count_processes(word: str, device: str | None) -> tuple[int, str]:
    """torchrun's --nproc-per-node word as a count, and the device it implies when none is given."""
    if word == "cpu":
        return usable_cores(), device or "cpu"
    if word in ("gpu", "xpu"):
        kind = "cuda" if word == "gpu" else "xpu"
        if not is_available(kind):
            raise OptionError(
                "--nproc-per-node", word, f"no {kind} device is visible here",
                "Give a number of processes, or --nproc-per-node cpu (or auto) to count the cores.",
            )  # fmt: skip
        return device_count(kind), device or kind
    # auto: one per accelerator when there is one, else one per usable core (torch's meaning)
    if torch.accelerator.is_available():
        kind = torch.accelerator.current_accelerator().type
        return int(torch.accelerator.device_count()), device or kind
    return usable_cores(), device or "cpu"


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


def _endpoint(endpoint: str) -> tuple[str, int | None]:
    """torchrun's HOST[:PORT] (an IPv6 address in brackets), with None for a missing port."""
    endpoint = endpoint.strip()
    if endpoint.startswith("[") and endpoint.endswith("]"):
        host, port = endpoint, None
    elif ":" in endpoint:
        host, port_text = endpoint.rsplit(":", 1)
        if not port_text.isdigit() or int(port_text) > 65535:
            raise OptionError(
                "--rdzv-endpoint", endpoint, "the port must be a number between 0 and 65535", "Give HOST:PORT."
            )
        port = int(port_text)
    else:
        host, port = endpoint, None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not re.fullmatch(r"[\w.:-]+", host):
        raise OptionError("--rdzv-endpoint", endpoint, "the host must be a host name or an IP address")
    return host, port


def _rendezvous_conf(text: str) -> dict[str, str]:
    """torchrun's --rdzv-conf KEY=VALUE,...: the keys phalanx gives a meaning and those without effect."""
    conf: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not key or not value:
            raise OptionError("--rdzv-conf", text, "its form is KEY=VALUE,KEY=VALUE,...")
        if key not in (*_RDZV_CONF_TIMEOUTS, "is_host", *_RDZV_CONF_WITHOUT_EFFECT):
            raise OptionError(
                "--rdzv-conf", text, f"phalanx knows no rendezvous setting {key!r}",
                f"It takes {', '.join(_RDZV_CONF_TIMEOUTS)} (seconds to reach the store) and is_host; "
                f"{', '.join(_RDZV_CONF_WITHOUT_EFFECT)} are torchrun's elastic settings, accepted without effect.",
            )  # fmt: skip
        conf[key] = value
    return conf


def _rendezvous_keywords(args: argparse.Namespace, n_nodes: int, node_rank: int | None) -> dict[str, Any]:
    """master_addr, master_port and connect_timeout from the rendezvous options (torchrun's or phalanx's)."""
    keywords: dict[str, Any] = {"master_addr": args.master_addr, "master_port": args.master_port}
    backend = str(getattr(args, "rdzv_backend", "static")).strip().lower()
    endpoint = getattr(args, "rdzv_endpoint", "") or ""
    if getattr(args, "standalone", False):
        if n_nodes > 1:
            raise OptionError(
                "--standalone", None, f"it runs one node, and --nnodes is {n_nodes}",
                "On several nodes give each one --rdzv-endpoint NODE0:PORT (or --master-addr/--master-port) and "
                "its --node-rank.",
            )  # fmt: skip
        keywords.update(master_addr="localhost", master_port=None)  # torchrun's localhost:0
        backend, endpoint = "c10d", ""
    elif backend in ("etcd", "etcd-v2"):
        raise OptionError(
            "--rdzv-backend", backend, "phalanx has no etcd rendezvous: its ranks meet on a store that node 0 hosts",
            "Use --rdzv-backend c10d --rdzv-endpoint NODE0:PORT (or --master-addr NODE0 --master-port PORT) with "
            "--node-rank on each node.",
        )  # fmt: skip
    elif backend not in ("static", "c10d"):
        raise OptionError("--rdzv-backend", backend, "allowed are static (the default) and c10d")
    if endpoint.strip():
        host, port = _endpoint(endpoint)
        if port is None and backend == "c10d" and n_nodes > 1:
            port = _C10D_DEFAULT_PORT  # what torchrun's c10d uses on every node: they agree on it
        keywords.update(master_addr=host, master_port=port)
    if backend == "c10d" and n_nodes > 1 and node_rank is None:
        raise OptionError(
            "--rdzv-backend", "c10d", "torchrun numbers the nodes in the order they join; phalanx's nodes have "
            "fixed indexes", "Give each node its --node-rank (0 on the node at --rdzv-endpoint's host).",
        )  # fmt: skip
    conf = _rendezvous_conf(getattr(args, "rdzv_conf", "") or "")
    for key in _RDZV_CONF_TIMEOUTS[::-1]:  # join_timeout wins over timeout
        if key in conf:
            try:
                keywords["connect_timeout"] = float(conf[key])
            except ValueError:
                raise OptionError("--rdzv-conf", f"{key}={conf[key]}", "a timeout is a number of seconds") from None
    if "is_host" in conf:
        is_host = conf["is_host"].lower() in ("1", "true", "yes", "y", "on")
        if is_host != ((node_rank or 0) == 0):
            raise OptionError(
                "--rdzv-conf", f"is_host={conf['is_host']}", "node 0 hosts the store, and only node 0",
                "Give is_host=true on node 0 only, or leave is_host out.",
            )  # fmt: skip
    return keywords


def check_torchrun_options(args: argparse.Namespace) -> None:
    """Refuse the torchrun options that phalanx cannot honour, saying what to use instead (`OptionError`)."""
    if getattr(args, "module", False) and getattr(args, "no_python", False):
        raise OptionError(
            "--no-python", None, "it cannot go with -m (--module): a module runs in Python",
            "Give one of them, as torchrun requires.",
        )  # fmt: skip
    refusals = {
        "local_addr": (
            "--local-addr", "every node reaches node 0 at --master-addr (or --rdzv-endpoint's host); there is no "
            "other address to give", "Leave --local-addr out.",
        ),
        "logs_specs": (
            "--logs-specs", "phalanx lays out the ranks' log files itself and loads no torchrun.logs_specs plugin",
            "Use --log-dir with --redirects or --tee.",
        ),
        "numa_binding": (
            "--numa-binding", "phalanx does not bind ranks to NUMA nodes",
            "Start phalanx run under numactl (or taskset), or give each rank its cores in the script.",
        ),
        "shutdown_timeout": (
            "--shutdown-timeout", "after a stop signal phalanx gives every rank 0.8 s, then kills it; that is not "
            "configurable", "Leave --shutdown-timeout out, and save what must survive before the signal comes.",
        ),
        "virtual_local_rank": (
            "--virtual-local-rank", "each rank's LOCAL_RANK is its place on the node, and it sees every device",
            "Leave it out; use torch.device('cuda', int(os.environ['LOCAL_RANK'])) in the script.",
        ),
    }  # fmt: skip
    for dest, (option, reason, fix) in refusals.items():
        value = getattr(args, dest, None)
        if value:
            raise OptionError(option, value, reason, fix)
    handler = getattr(args, "event_log_handler", "null")
    if handler.strip().lower() != "null":
        raise OptionError(
            "--event-log-handler", handler, "phalanx records no torchelastic events", "Leave it out, or give null."
        )
    for name in filter(None, (part.strip() for part in getattr(args, "signals_to_handle", "").split(","))):
        if not isinstance(getattr(signal, name, None), signal.Signals):
            raise OptionError("--signals-to-handle", name, "that is not a signal's name, such as SIGTERM")
        if name not in TORCHRUN_SIGNALS:
            raise OptionError(
                "--signals-to-handle", name, "phalanx forwards SIGTERM, SIGINT and SIGHUP (SIGQUIT ends it and its "
                "ranks); SIGUSR1 asks a rank for its stack in a hang report, and other signals are not forwarded",
                f"Give a subset of {','.join(TORCHRUN_SIGNALS)}.",
            )  # fmt: skip


def platform_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The `Platform` keyword arguments that the options of `add_platform_arguments` describe.

    With `add_torchrun_arguments`' options too: the rendezvous (--standalone, --rdzv-endpoint,
    --rdzv-conf) and --max-restarts. Raises `PlatformError` for `--distributed` on cpu without
    `--nproc-per-node`, and `OptionError` for torchrun options phalanx cannot honour.
    """
    device = args.device or ("cuda" if getattr(args, "cuda", False) else None)
    n_procs = args.nproc_per_node
    if isinstance(n_procs, str):  # torchrun's words: auto, cpu, gpu, xpu
        n_procs, device = _count_processes(n_procs, device)
    device = device or "auto"
    if n_procs is None:
        n_procs = _default_n_procs(device, args.cluster, getattr(args, "distributed", False))
    keywords = {
        "device": device,
        "n_procs": n_procs,
        "n_nodes": args.nnodes,
        "node_rank": args.node_rank or 0,
        **_rendezvous_keywords(args, args.nnodes, args.node_rank),
        "backend": args.backend,
        "timeout": args.timeout,
        "seed": args.seed,
        "cluster": args.cluster,
        "console_logs": not getattr(args, "quiet", False),
        "rank_prefix": not getattr(args, "no_prefix", False),
    }
    if getattr(args, "max_restarts", 0):
        keywords["max_restarts"] = args.max_restarts
    return keywords
