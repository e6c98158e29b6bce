"""`Platform`: where and how a function runs, validated once, at construction.

A `Platform` is a frozen record. `resolve()` fills in what "auto" and the defaults mean on
this machine (device, process count, backend, threads per process) and returns a new one;
the runners only ever see resolved platforms. What a job submitted to SLURM asks for is one
more frozen record, `SlurmOptions`, in `Platform.slurm`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from phalanx.arguments import platform_keywords, stream_bits, valid_streams
from phalanx.devices import (
    BACKEND_DEVICES,
    DEFAULT_BACKENDS,
    DEVICE_ALIASES,
    available_device_types,
    backend_available,
    default_device_type,
    device_count,
    device_type_exists,
    is_available,
    usable_cores,
)
from phalanx.environment import Environment
from phalanx.errors import PlatformError

__all__ = ["Platform", "RankLogs", "SlurmOptions", "available_device_types", "default_device_type"]

CLUSTERS = ("auto", "local", "env", "slurm")
# SLURM's time formats: minutes, MM:SS, HH:MM:SS, and with days D-HH, D-HH:MM, D-HH:MM:SS.
_SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_SLURM_TIME_FORMATS = "'MM', 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM' or 'D-HH:MM:SS'"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _slurm_seconds(time: str) -> int | None:
    """Seconds in a SLURM time string, or None when it is not one of SLURM's formats."""
    match = _SLURM_TIME.fullmatch(time.strip())
    if match is None:
        return None
    days, first, second, third = (int(part) if part else 0 for part in match.groups())
    if match.group(1) is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + first * 3600 + second * 60 + third
    if match.group(4) is not None:  # HH:MM:SS
        return first * 3600 + second * 60 + third
    return first * 60 + second  # MM or MM:SS


def _check_slurm_option(name: str, value: object, owner: str) -> None:
    """Raise `PlatformError` (as `owner(name=value)`) for a SLURM option that sbatch cannot take."""
    if name in ("partition", "account", "qos"):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise PlatformError(name, value, f"it must be the name of a SLURM {name} (a string), or None", owner=owner)
    elif name == "time":
        if value is None or (_is_count(value) and value > 0):
            return
        if not isinstance(value, str) or not _slurm_seconds(value):
            raise PlatformError(
                name, value, f"it must be minutes (a whole number of at least 1) or {_SLURM_TIME_FORMATS}", owner=owner
            )
    elif name == "ram":
        if value is not None and not ((_is_count(value) and value > 0) or isinstance(value, str)):
            raise PlatformError(
                name, value, "it must be gigabytes (a whole number) or a string such as '16G'", owner=owner
            )
    elif name == "slurm_additional_parameters":
        if value is not None and not isinstance(value, dict):
            raise PlatformError(name, value, "it must be a dict of sbatch options", owner=owner)
    elif name == "requeue" and not isinstance(value, bool):
        raise PlatformError(name, value, "it must be True or False", owner=owner)


@dataclass(frozen=True)
class SlurmOptions:
    """What `cluster="slurm"` asks of SLURM for the job: partition, time, memory, account.

    `Platform` keeps them in its `slurm` field, and takes them by their own names too (DDPW's):
    `Platform(partition="gpu")` is `Platform(slurm=SlurmOptions(partition="gpu"))`. Bad values
    raise `PlatformError` at construction, naming the field.

    `time` is minutes, or one of SLURM's formats ("HH:MM:SS", "D-HH:MM:SS", ...; 60 minutes
    when unset); `ram` is gigabytes, or a string for sbatch's `--mem` such as "16G";
    `slurm_additional_parameters` holds any other sbatch option; `requeue` requeues the job
    when SLURM preempts it or its time runs out.

    Example::

        slurm = SlurmOptions(partition="gpu", time="2:00:00", ram="64G", account="lab")
        Platform(device="gpu", n_procs=4, cluster="slurm", slurm=slurm)
    """

    partition: str | None = None
    time: int | str | None = None
    ram: int | str | None = None
    account: str | None = None
    qos: str | None = None
    slurm_additional_parameters: dict[str, Any] | None = field(default=None, hash=False)
    requeue: bool = False

    def __post_init__(self) -> None:
        for option in dataclasses.fields(self):
            _check_slurm_option(option.name, getattr(self, option.name), owner="SlurmOptions")

    @property
    def minutes(self) -> int:
        """The time limit in whole minutes, rounded up (60 when `time` is unset)."""
        if self.time is None:
            return 60
        if isinstance(self.time, int):
            return self.time
        return math.ceil(_slurm_seconds(self.time) / 60)


_SLURM_OPTIONS = tuple(option.name for option in dataclasses.fields(SlurmOptions))
_SLURM_DEFAULTS = SlurmOptions()


def _merge_slurm(slurm: object, given: dict[str, Any]) -> object:
    """`slurm` with the options given by their own names (`Platform(partition=...)`) filled in.

    A name that `slurm` sets to another value is refused: there is no telling which one was meant.
    """
    for name, value in given.items():
        _check_slurm_option(name, value, owner="Platform")
    if not isinstance(slurm, SlurmOptions):
        return slurm  # __post_init__ refuses it, naming the field
    for name, value in given.items():
        theirs = getattr(slurm, name)
        if theirs != getattr(_SLURM_DEFAULTS, name) and theirs != value:
            raise PlatformError(
                name,
                value,
                f"slurm=SlurmOptions(...) gives {name}={theirs!r}",
                f"Give {name} once, by its name or in slurm=SlurmOptions(...); to change it on a platform p: "
                f"dataclasses.replace(p, slurm=dataclasses.replace(p.slurm, {name}=...)).",
            )
    return dataclasses.replace(slurm, **given)


_STDOUT, _STDERR = 1, 2  # torchrun's Std bits, as --redirects and --tee give them


@dataclass(frozen=True)
class RankLogs:
    """Where each rank's output goes besides the console: torchrun's --log-dir, --redirects, --tee.

    `folder` is the run's folder: each start of the ranks writes `attempt_<n>/<local rank>/`
    there, with `stdout.log` and `stderr.log` for the streams that go to files, as torchrun lays
    them out (`phalanx run --log-dir` makes it as torchrun does: `<log_dir>/<run_id>_<random>`).
    `redirects` and `tee` are torchrun's forms: "0" none, "1" stdout, "2" stderr, "3" both, or
    per local rank, "0:3,1:1". A redirected stream goes to its file only, a tee'd one to the
    file and the console. `console_ranks` (torchrun's --local-ranks-filter) are the local ranks
    whose output the console shows (None: all; the files keep every rank's). Tee'd lines that
    contain one of `stdout_filters` (`stderr_filters`) are copied to
    `attempt_<n>/filtered_stdout.log` (`filtered_stderr.log`).

    Example::

        Platform(device="cpu", n_procs=2, rank_logs=RankLogs("logs/run-1", tee="3"))
    """

    folder: str | None = None
    redirects: str = "0"
    tee: str = "0"
    console_ranks: tuple[int, ...] | None = None
    stdout_filters: tuple[str, ...] = ()
    stderr_filters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.folder is not None and (not isinstance(self.folder, (str, os.PathLike)) or not str(self.folder)):
            raise PlatformError("folder", self.folder, "it must be a folder's path, or None", owner="RankLogs")
        if self.folder is not None:
            object.__setattr__(self, "folder", os.fspath(self.folder))
        for name in ("redirects", "tee"):
            value = getattr(self, name)
            if not isinstance(value, str) or not valid_streams(value):
                raise PlatformError(
                    name, value, "it must be torchrun's form: '0', '1' (stdout), '2' (stderr), '3' (both), or per "
                    "local rank, such as '0:3,1:1'", owner="RankLogs",
                )  # fmt: skip
        if self.folder is None and (self.redirects != "0" or self.tee != "0"):
            raise PlatformError(
                "folder", None, f"redirects={self.redirects!r} and tee={self.tee!r} write files, in a folder",
                "Give folder=..., the run's log folder.", owner="RankLogs",
            )  # fmt: skip
        if self.console_ranks is not None:
            ranks = tuple(self.console_ranks) if not isinstance(self.console_ranks, (str, bytes)) else ()
            if not ranks or not all(_is_count(rank) and rank >= 0 for rank in ranks):
                raise PlatformError(
                    "console_ranks", self.console_ranks, "it must be local ranks (whole numbers >= 0), or None",
                    owner="RankLogs",
                )  # fmt: skip
            object.__setattr__(self, "console_ranks", ranks)
        for name in ("stdout_filters", "stderr_filters"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(item, str) and item for item in value):
                raise PlatformError(name, value, "it must be a tuple of non-empty strings", owner="RankLogs")
            object.__setattr__(self, name, tuple(value))

    def to_file(self, local_rank: int, stream: str) -> bool:
        """Whether this local rank's stream (`"stdout"` or `"stderr"`) is written to its log file."""
        bit = _STDOUT if stream == "stdout" else _STDERR
        return bool((stream_bits(self.redirects, local_rank) | stream_bits(self.tee, local_rank)) & bit)

    def to_console(self, local_rank: int, stream: str) -> bool:
        """Whether the console shows this local rank's stream: not redirected only, and not filtered out."""
        bit = _STDOUT if stream == "stdout" else _STDERR
        redirected_only = stream_bits(self.redirects, local_rank) & ~stream_bits(self.tee, local_rank) & bit
        return not redirected_only and (self.console_ranks is None or local_rank in self.console_ranks)

    def line_filters(self, local_rank: int, stream: str) -> tuple[str, ...]:
        """The filters whose lines are copied to the attempt's filtered file (tee'd streams shown on the console)."""
        bit = _STDOUT if stream == "stdout" else _STDERR
        if self.folder is None or not stream_bits(self.tee, local_rank) & bit:
            return ()
        if self.console_ranks is not None and local_rank not in self.console_ranks:
            return ()
        return self.stdout_filters if stream == "stdout" else self.stderr_filters


def _slurm_option_property(name: str) -> property:
    return property(
        lambda platform: getattr(platform.slurm, name),
        doc=f"`slurm.{name}`: the SLURM option, by the name `Platform({name}=...)` takes.",
    )


@dataclass(frozen=True)
class Platform:
    """Where and how to run: device, process counts, rendezvous, cluster.

    Change only this to move a job from one CPU process to several, to every GPU, to a
    cluster. Bad values raise `PlatformError` at construction, naming the field.

    What `cluster="slurm"` asks of SLURM is in `slurm`, a `SlurmOptions`; its fields are also
    taken by their own names, DDPW's (`partition`, `time`, `ram`, `account`, `qos`,
    `slurm_additional_parameters`, `requeue`), and read back the same way (`platform.partition`).
    Where each rank's output goes besides the console (torchrun's log files) is `rank_logs`, a
    `RankLogs`.

    Example::

        Platform(device="cpu", n_procs=4)
        Platform(device="gpu")                 # one process per visible GPU
        Platform(device="gpu", cluster="slurm", partition="gpu", time="1:00:00")
    """

    device: str = "auto"
    n_procs: int | None = None
    n_gpus: int | None = None
    n_cpus: int | None = None
    n_nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    backend: str | None = None
    timeout: float | timedelta | None = None
    seed: int | None = None
    max_restarts: int = 0
    cluster: str = "auto"
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    log_dir: str = "phalanx_logs"
    rank_logs: RankLogs = field(default_factory=RankLogs)
    console_logs: bool = True
    rank_prefix: bool = True
    connect_timeout: float | timedelta = 30.0
    environment: Environment | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self._validate_device()
        self._validate_counts()
        self._validate_rendezvous()
        self._validate_backend()
        self._validate_misc()

    # -- validation -------------------------------------------------------------------------

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def _validate_device(self) -> None:
        device = self.device
        if isinstance(device, torch.device):
            device = device.type if device.index is None else str(device)
        if not isinstance(device, str) or not device:
            raise PlatformError("device", self.device, "it must be a device type name such as 'cpu'")
        name = DEVICE_ALIASES.get(device.strip().lower(), device.strip().lower())
        if ":" in name:
            raise PlatformError(
                "device",
                self.device,
                "a device type is expected, without an index: each rank gets its own index",
                "Use device='cuda' and choose GPUs with CUDA_VISIBLE_DEVICES.",
            )
        if name != "auto" and not device_type_exists(name):
            raise PlatformError(
                "device",
                self.device,
                "allowed are 'auto', 'cpu', 'gpu' (alias of 'cuda'), 'cuda', 'mps', 'xpu' or another torch device type",
            )
        if self.cluster == "slurm" or name == "auto":
            self._set("device", name)
            return
        if not is_available(name):
            raise PlatformError(
                "device",
                self.device,
                f"no {name} device is available here (available: {', '.join(available_device_types())})",
                "Use device='auto' to take the best available device, or device='cpu'.",
            )
        self._set("device", name)

    def _validate_counts(self) -> None:
        for name in ("n_procs", "n_gpus", "n_cpus"):
            value = getattr(self, name)
            if value is not None and (not _is_count(value) or value < 1):
                raise PlatformError(name, value, "it must be a whole number of at least 1, or None")
        if self.n_gpus is not None:
            if self.n_procs is not None and self.n_procs != self.n_gpus:
                raise PlatformError(
                    "n_gpus",
                    self.n_gpus,
                    f"it is DDPW's name for n_procs, and n_procs={self.n_procs} disagrees",
                    "Give only one of n_procs and n_gpus.",
                )
            self._set("n_procs", self.n_gpus)
        if not _is_count(self.n_nodes) or self.n_nodes < 1:
            raise PlatformError("n_nodes", self.n_nodes, "it must be a whole number of at least 1")
        if not _is_count(self.node_rank) or not 0 <= self.node_rank < self.n_nodes:
            raise PlatformError(
                "node_rank", self.node_rank, f"it must be between 0 and n_nodes - 1 = {self.n_nodes - 1}"
            )
        if not _is_count(self.max_restarts) or self.max_restarts < 0:
            raise PlatformError("max_restarts", self.max_restarts, "it must be a whole number >= 0")

    def _validate_rendezvous(self) -> None:
        if not isinstance(self.master_addr, str) or not self.master_addr.strip():
            raise PlatformError("master_addr", self.master_addr, "it must be a host name or an IP address")
        port = self.master_port
        if port is not None and (not _is_count(port) or not 0 <= port <= 65535):
            raise PlatformError(
                "master_port",
                port,
                "it must be a port number between 1 and 65535, or None (0 means the same)",
                "Leave it unset (None) to let the system pick a free port.",
            )
        if port == 0:
            self._set("master_port", None)
        if self.cluster not in CLUSTERS:
            raise PlatformError("cluster", self.cluster, f"allowed are {', '.join(map(repr, CLUSTERS))}")
        if self.environment is not None:
            if not isinstance(self.environment, Environment):
                raise PlatformError(
                    "environment",
                    self.environment,
                    "it must be a phalanx.environment.Environment (such as Explicit(rank, world_size)), or None",
                )
            if self.cluster not in ("auto", "env"):
                raise PlatformError(
                    "environment",
                    self.environment,
                    f"an environment states the places of processes that exist already, and cluster={self.cluster!r} "
                    "starts its own",
                    "Use cluster='auto' or 'env' with environment=..., or leave environment unset.",
                )
            self._set("cluster", "env")
        if self.n_nodes > 1 and self.cluster in ("auto", "local") and self.master_port is None:
            raise PlatformError(
                "master_port",
                None,
                f"n_nodes={self.n_nodes} nodes meet at master_addr:master_port, which node 0 hosts",
                "Set master_addr to node 0's address and master_port to a free port there, the same on every node.",
            )

    def _validate_backend(self) -> None:
        backend = self.backend
        if backend is None:
            return
        if not isinstance(backend, str) or not backend:
            raise PlatformError("backend", backend, "it must be a backend name such as 'gloo' or 'nccl'")
        backend = backend.lower()
        self._set("backend", backend)
        known = sorted(BACKEND_DEVICES)
        if backend not in BACKEND_DEVICES and not backend_available(backend):
            raise PlatformError("backend", backend, f"known backends are {', '.join(known)}")
        devices = BACKEND_DEVICES.get(backend)
        if devices is not None and self.device != "auto" and self.device not in devices:
            raise PlatformError(
                "backend",
                backend,
                f"{backend} does not serve device {self.device!r} (it serves {', '.join(sorted(devices))})",
                f"Use backend={DEFAULT_BACKENDS.get(self.device, 'gloo')!r} or leave it unset.",
            )
        if self.cluster != "slurm" and not backend_available(backend):
            raise PlatformError(
                "backend",
                backend,
                f"this torch build has no {backend} support",
                "Leave backend unset to take the device's default.",
            )

    def _validate_seconds(self, name: str, optional: bool) -> None:
        value = getattr(self, name)
        if value is None and optional:
            return
        seconds = value.total_seconds() if isinstance(value, timedelta) else value
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
            raise PlatformError(name, value, "it must be a positive number of seconds, or a timedelta")
        if not math.isfinite(seconds):
            raise PlatformError(
                name,
                value,
                "it must be a finite number of seconds: every wait in phalanx ends in an error that names it",
                f"For a very long job give a large bound, such as {name}=7 * 24 * 3600 (a week).",
            )

    def _validate_misc(self) -> None:
        self._validate_seconds("timeout", optional=True)
        self._validate_seconds("connect_timeout", optional=False)
        if self.seed is not None and not _is_count(self.seed):
            raise PlatformError("seed", self.seed, "it must be a whole number or None")
        for name in ("console_logs", "rank_prefix"):
            if not isinstance(getattr(self, name), bool):
                raise PlatformError(name, getattr(self, name), "it must be True or False")
        if not isinstance(self.rank_logs, RankLogs):
            raise PlatformError(
                "rank_logs", self.rank_logs, "it must be a phalanx.platform.RankLogs, such as RankLogs('logs', tee='3')"
            )
        if not isinstance(self.slurm, SlurmOptions):
            raise PlatformError(
                "slurm", self.slurm, "it must be a phalanx.SlurmOptions, such as SlurmOptions(partition='gpu')"
            )
        if self.device not in ("auto", "cuda") or self.cluster == "slurm" or self.n_procs is None:
            return
        if self.device == "cuda" and self.backend in (None, "nccl"):
            visible = device_count("cuda")
            if self.n_procs > visible:
                raise PlatformError(
                    "n_procs",
                    self.n_procs,
                    f"only {visible} CUDA device(s) are visible and nccl needs one GPU per rank",
                    "Lower n_procs, or share GPUs between ranks with backend='gloo'.",
                )

    @classmethod
    def from_args(cls, args: Any) -> Platform:
        """The platform described by the options that `phalanx.add_platform_arguments` added.

        Example::

            parser = argparse.ArgumentParser()
            px.add_platform_arguments(parser)
            platform = px.Platform.from_args(parser.parse_args(["--nproc-per-node", "2"]))
        """
        return cls(**platform_keywords(args))

    # DDPW's names for the SLURM options, read from `slurm` (see `_accept_slurm_option_names`).
    partition = _slurm_option_property("partition")
    time = _slurm_option_property("time")
    ram = _slurm_option_property("ram")
    account = _slurm_option_property("account")
    qos = _slurm_option_property("qos")
    slurm_additional_parameters = _slurm_option_property("slurm_additional_parameters")
    requeue = _slurm_option_property("requeue")

    # -- resolution -------------------------------------------------------------------------

    @property
    def timeout_delta(self) -> timedelta:
        """The collective timeout as a timedelta (torch's default of 30 minutes when unset)."""
        if self.timeout is None:
            return timedelta(minutes=30)
        if isinstance(self.timeout, timedelta):
            return self.timeout
        return timedelta(seconds=self.timeout)

    @property
    def connect_timeout_delta(self) -> timedelta:
        """How long a rank tries to reach the job's store before it gives up with a `LaunchError`."""
        if isinstance(self.connect_timeout, timedelta):
            return self.connect_timeout
        return timedelta(seconds=self.connect_timeout)

    @property
    def world_size(self) -> int:
        """Ranks in the whole job: processes per node times nodes (resolve first)."""
        return (self.n_procs or 1) * self.n_nodes

    def resolve(self) -> Platform:
        """Return a copy with every "auto" and default made concrete for this machine."""
        device = default_device_type() if self.device == "auto" else self.device
        n_procs = self.n_procs
        if n_procs is None:
            n_procs = device_count(device) if device in ("cuda", "xpu") else 1
        n_cpus = self.n_cpus
        if n_cpus is None:
            n_cpus = max(1, usable_cores() // n_procs)
        backend = self.backend or DEFAULT_BACKENDS.get(device, "gloo")
        cluster = "local" if self.cluster == "auto" else self.cluster
        if device == "cuda" and backend == "nccl" and cluster != "slurm" and n_procs > device_count("cuda"):
            raise PlatformError(
                "n_procs",
                n_procs,
                f"only {device_count('cuda')} CUDA device(s) are visible and nccl needs one GPU per rank",
                "Lower n_procs, or share GPUs between ranks with backend='gloo'.",
            )
        return dataclasses.replace(
            self, device=device, n_procs=n_procs, n_gpus=None, n_cpus=n_cpus, backend=backend, cluster=cluster
        )


def _accept_slurm_option_names(init: Any) -> Any:
    """Make `Platform(partition=..., time=...)` mean `Platform(slurm=SlurmOptions(partition=..., ...))`.

    The SLURM options are not fields of their own: `slurm` is the one place they live, so that
    `dataclasses.replace(platform, n_procs=4)` or `replace(platform, slurm=...)` carries one
    record, never two copies that could disagree.
    """

    @functools.wraps(init)
    def __init__(self: Platform, *args: Any, **kwargs: Any) -> None:
        given = {name: kwargs.pop(name) for name in _SLURM_OPTIONS if name in kwargs}
        if given:
            kwargs["slurm"] = _merge_slurm(kwargs.get("slurm", _SLURM_DEFAULTS), given)
        init(self, *args, **kwargs)

    signature = inspect.signature(init)
    extra = [
        inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=option.default, annotation=option.type)
        for option in dataclasses.fields(SlurmOptions)
    ]
    __init__.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    return __init__


Platform.__init__ = _accept_slurm_option_names(Platform.__init__)
