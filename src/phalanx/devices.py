"""What phalanx knows about devices: which types exist here, how many, which backend serves them.

One place for the device questions that `Platform`, the worker, `phalanx.dist` and the compat
modules ask, so that they all give the same answer: for instance, which device a rank with
local rank k computes on (`rank_device`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "BACKEND_DEVICES",
    "DEFAULT_BACKENDS",
    "DEVICE_ALIASES",
    "available_device_types",
    "backend_available",
    "default_device_type",
    "device_count",
    "device_type_exists",
    "is_available",
    "rank_device",
    "select_rank_device",
    "usable_cores",
]

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
# Other names users give a device type.
DEVICE_ALIASES = {"gpu": "cuda"}
# Device types with a single device and no index: every rank shares it.
_UNINDEXED = ("cpu", "mps")


def device_type_exists(name: str) -> bool:
    """Whether torch knows a device type of this name (whether or not one is present here)."""
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def is_available(device_type: str) -> bool:
    """Whether a device of this type is usable here ("cpu" always is)."""
    if device_type == "cpu":
        return True
    if device_type == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    module = getattr(torch, device_type, None)
    check = getattr(module, "is_available", None)
    return bool(check and check())


def device_count(device_type: str) -> int:
    """How many devices of this type this process sees (1 for cpu and mps, which have no index)."""
    if device_type in _UNINDEXED:
        return 1
    module = getattr(torch, device_type, None)
    count = getattr(module, "device_count", None)
    return int(count()) if count else 1


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), not every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_device_types() -> list[str]:
    """The accelerator types usable here, best first, always ending with "cpu"."""
    return [name for name in ("cuda", "mps", "xpu") if is_available(name)] + ["cpu"]


def default_device_type() -> str:
    """What device="auto" means here: cuda, then mps, then xpu, then cpu."""
    return available_device_types()[0]


def backend_available(backend: str) -> bool:
    """Whether this torch build can create a process group with this backend."""
    check = getattr(dist, f"is_{backend}_available", None)
    if check is not None:
        return bool(check())
    registered = getattr(dist.Backend, "backend_list", [])
    return backend in registered or backend.upper() in registered


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """The device that the rank with this local rank computes on.

    cpu and mps have no index; other types take device `local_rank % count`, so that ranks
    share the visible devices in turn when there are more ranks than devices (gloo allows it).

    Example::

        rank_device("cuda", 3)   # device(type='cuda', index=1) with 2 visible GPUs
        rank_device("cpu", 3)    # device(type='cpu')
    """
    if device_type in _UNINDEXED:
        return torch.device(device_type)
    return torch.device(device_type, local_rank % max(1, device_count(device_type)))


def select_rank_device(device_type: str, local_rank: int) -> torch.device:
    """`rank_device`, made this process's current device of its type (`torch.cuda.set_device`)."""
    chosen = rank_device(device_type, local_rank)
    set_device = getattr(getattr(torch, device_type, None), "set_device", None)
    if chosen.index is not None and set_device is not None:
        set_device(chosen.index)
    return chosen
