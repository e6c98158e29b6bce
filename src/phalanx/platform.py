"""`Platform`: where and how a function runs, validated once, at construction.

A `Platform` is a frozen record. `resolve()` fills in what "auto" and the defaults mean on
this machine (device, process count, backend, threads per process) and returns a new one;
the runners only ever see resolved platforms.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from phalanx.environment import Environment
from phalanx.errors import PlatformError

__all__ = ["Platform", "available_device_types", "default_device_type"]

CLUSTERS = ("auto", "local", "env", "slurm")
# Which process-group backend suits which device type, and which device types a backend serves.
DEFAULT_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl", "mps": "gloo", "hpu": "hccl"}
BACKEND_DEVICES = {
    "gloo": {"cpu", "cuda", "mps"},
    "nccl": {"cuda"},
    "mpi": {"cpu", "cuda"},
    "ucc": {"cpu", "cuda"},
    "xccl": {"xpu"},
    "hccl": {"hpu"},
}
_DEVICE_ALIASES = {"gpu": "cuda"}


def _device_type_exists(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def _is_available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    if device_type == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    module = getattr(torch, device_type, None)
    is_available = getattr(module, "is_available", None)
    return bool(is_available and is_available())


def _device_count(device_type: str) -> int:
    if device_type in ("cpu", "mps"):
        return 1
    module = getattr(torch, device_type, None)
    count = getattr(module, "device_count", None)
    return int(count()) if count else 1


def _usable_cores() -> int:
    """Cores this process may run on (its affinity mask), not every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_device_types() -> list[str]:
    """The accelerator types usable here, best first, always ending with "cpu"."""
    return [name for name in ("cuda", "mps", "xpu") if _is_available(name)] + ["cpu"]


def default_device_type() -> str:
    """What device="auto" means here: cuda, then mps, then xpu, then cpu."""
    return available_device_types()[0]


def _backend_available(backend: str) -> bool:
    import torch.distributed as dist

    check = getattr(dist, f"is_{backend}_available", None)
    if check is not None:
        return bool(check())
    return backend.upper() in getattr(dist.Backend, "backend_list", []) or backend in getattr(
        dist.Backend, "backend_list", []
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Platform:
    """Where and how to run: device, process counts, rendezvous, cluster.

    Change only this to move a job from one CPU process to several, to every GPU, to a
    cluster. Bad values raise `PlatformError` at construction, naming the field.

    Example::

        Platform(device="cpu", n_procs=4)
        Platform(device="gpu")                 # one process per visible GPU
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
    partition: str | None = None
    time: int | str | None = None
    ram: int | str | None = None
    account: str | None = None
    qos: str | None = None
    slurm_additional_parameters: dict[str, Any] | None = field(default=None, hash=False)
    requeue: bool = False
    log_dir: str = "phalanx_logs"
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
        name = _DEVICE_ALIASES.get(device.strip().lower(), device.strip().lower())
        if ":" in name:
            raise PlatformError(
                "device",
                self.device,
                "a device type is expected, without an index: each rank gets its own index",
                "Use device='cuda' and choose GPUs with CUDA_VISIBLE_DEVICES.",
            )
        if name != "auto" and not _device_type_exists(name):
            raise PlatformError(
                "device",
                self.device,
                "allowed are 'auto', 'cpu', 'gpu' (alias of 'cuda'), 'cuda', 'mps', 'xpu' or another torch device type",
            )
        if self.cluster == "slurm" or name == "auto":
            self._set("device", name)
            return
        if not _is_available(name):
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
        if backend not in BACKEND_DEVICES and not _backend_available(backend):
            raise PlatformError("backend", backend, f"known backends are {', '.join(known)}")
        devices = BACKEND_DEVICES.get(backend)
        if devices is not None and self.device != "auto" and self.device not in devices:
            raise PlatformError(
                "backend",
                backend,
                f"{backend} does not serve device {self.device!r} (it serves {', '.join(sorted(devices))})",
                f"Use backend={DEFAULT_BACKENDS.get(self.device, 'gloo')!r} or leave it unset.",
            )
        if self.cluster != "slurm" and not _backend_available(backend):
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
        for name in ("requeue", "console_logs", "rank_prefix"):
            if not isinstance(getattr(self, name), bool):
                raise PlatformError(name, getattr(self, name), "it must be True or False")
        if self.time is not None and not ((_is_count(self.time) and self.time > 0) or isinstance(self.time, str)):
            raise PlatformError("time", self.time, "it must be minutes (a whole number) or 'HH:MM:SS'")
        if self.ram is not None and not ((_is_count(self.ram) and self.ram > 0) or isinstance(self.ram, str)):
            raise PlatformError("ram", self.ram, "it must be gigabytes (a whole number) or a string such as '16G'")
        extra = self.slurm_additional_parameters
        if extra is not None and not isinstance(extra, dict):
            raise PlatformError("slurm_additional_parameters", extra, "it must be a dict of sbatch options")
        if self.device not in ("auto", "cuda") or self.cluster == "slurm" or self.n_procs is None:
            return
        if self.device == "cuda" and self.backend in (None, "nccl"):
            visible = _device_count("cuda")
            if self.n_procs > visible:
                raise PlatformError(
                    "n_procs",
                    self.n_procs,
                    f"only {visible} CUDA device(s) are visible and nccl needs one GPU per rank",
                    "Lower n_procs, or share GPUs between ranks with backend='gloo'.",
                )

    @classmethod
    def from_args(cls, args: Any) -> Platform:
        """The platform described by the options that `phalanx.add_platform_arguments` added."""
        from phalanx.cli import platform_from_args

        return platform_from_args(args)

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
            n_procs = _device_count(device) if device in ("cuda", "xpu") else 1
        n_cpus = self.n_cpus
        if n_cpus is None:
            n_cpus = max(1, _usable_cores() // n_procs)
        backend = self.backend or DEFAULT_BACKENDS.get(device, "gloo")
        cluster = "local" if self.cluster == "auto" else self.cluster
        if device == "cuda" and backend == "nccl" and cluster != "slurm" and n_procs > _device_count("cuda"):
            raise PlatformError(
                "n_procs",
                n_procs,
                f"only {_device_count('cuda')} CUDA device(s) are visible and nccl needs one GPU per rank",
                "Lower n_procs, or share GPUs between ranks with backend='gloo'.",
            )
        return dataclasses.replace(
            self, device=device, n_procs=n_procs, n_gpus=None, n_cpus=n_cpus, backend=backend, cluster=cluster
        )
