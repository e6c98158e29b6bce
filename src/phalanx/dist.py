"""Rank helpers and collectives that work the same with or without a process group.

Inside a launched rank they answer for that rank; in plain single-process code they behave
as world size 1 (rank 0, collectives return their input), so a training function runs
unchanged in both.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from phalanx import variables
from phalanx.devices import default_device_type, rank_device
from phalanx.environment import Environment, detect_environment
from phalanx.rank_state import current_place, join_lazy_group, on_rank_finish

__all__ = [
    "all_gather",
    "all_reduce",
    "barrier",
    "broadcast_from_master",
    "device",
    "get_local_rank",
    "get_local_world_size",
    "get_node_rank",
    "get_rank",
    "get_restart_count",
    "get_world_size",
    "is_distributed",
    "is_master",
    "on_rank_finish",
]

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "mean": dist.ReduceOp.SUM,  # summed, then divided: not every backend has AVG
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return default


def is_distributed() -> bool:
    """True inside a process group of more than one rank.

    Under `phalanx run` the group is made here, on first use, unless the script made it.
    """
    if not dist.is_available() or not join_lazy_group():
        return False
    return dist.get_world_size() > 1


def _launcher() -> Environment | None:
    """The launcher that started this process (srun, mpirun, ...), for answers outside a group."""
    return detect_environment()


def get_rank() -> int:
    """This process's global rank (0 when nothing is distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if variables.RANK in os.environ:
        return _env_int(variables.RANK, 0)
    launcher = _launcher()
    return launcher.global_rank() if launcher is not None else 0


def get_world_size() -> int:
    """Number of ranks in the job (1 when nothing is distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if variables.WORLD_SIZE in os.environ:
        return _env_int(variables.WORLD_SIZE, 1)
    launcher = _launcher()
    return launcher.world_size() if launcher is not None else 1


def get_local_rank() -> int:
    """This process's rank on its node."""
    place = current_place()
    return place.local_rank if place is not None else _env_int(variables.LOCAL_RANK, 0)


def get_local_world_size() -> int:
    """Number of ranks on this node."""
    place = current_place()
    return place.local_world_size if place is not None else _env_int(variables.LOCAL_WORLD_SIZE, 1)


def get_node_rank() -> int:
    """This node's index in the job."""
    place = current_place()
    if place is not None:
        return place.node_rank
    return _env_int(variables.NODE_RANK, _env_int(variables.GROUP_RANK, 0))


def get_restart_count() -> int:
    """How many times `Platform(max_restarts=...)` has restarted this job so far (0 on the first try)."""
    return _env_int(variables.RESTART_COUNT, 0)


def is_master() -> bool:
    """True on global rank 0, the rank that writes files and logs."""
    return get_rank() == 0


def device() -> torch.device:
    """The device this rank computes on (the best available one outside a launch)."""
    place = current_place()
    if place is not None:
        return place.device
    return rank_device(default_device_type(), get_local_rank())


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    """Where tensors must be for the group's backend: gloo and mpi work on CPU tensors only."""
    backend = dist.get_backend()
    return torch.device("cpu") if backend in ("gloo", "mpi") else device()


def broadcast_from_master(obj: Any) -> Any:
    """Return rank 0's `obj` on every rank (any picklable object, tensors included)."""
    if not is_distributed():
        return obj
    box = [obj if is_master() else None]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, as a list indexed by rank.

    Tensors are gathered with a tensor collective (shapes may differ between ranks) and come
    back on this rank's device; other objects are pickled.
    """
    if not is_distributed():
        return [obj]
    if isinstance(obj, torch.Tensor):
        return _all_gather_tensor(obj)
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _all_gather_tensor(tensor: torch.Tensor) -> list[torch.Tensor]:
    where = _collective_device()
    local = tensor.detach().to(where).contiguous()
    shapes: list[Any] = [None] * get_world_size()
    dist.all_gather_object(shapes, tuple(local.shape))
    if all(shape == shapes[0] for shape in shapes):
        out = [torch.empty_like(local) for _ in shapes]
        dist.all_gather(out, local)
        return [t.to(tensor.device) for t in out]
    largest = max(torch.Size(shape).numel() for shape in shapes)
    flat = torch.zeros(largest, dtype=local.dtype, device=where)
    flat[: local.numel()] = local.reshape(-1)
    out = [torch.empty_like(flat) for _ in shapes]
    dist.all_gather(out, flat)
    return [t[: torch.Size(s).numel()].reshape(s).to(tensor.device) for t, s in zip(out, shapes, strict=True)]


def all_reduce(x: Any, op: str = "mean") -> Any:
    """Reduce a tensor or a number over all ranks; returns the result, leaves `x` untouched.

    `op` is "mean", "sum", "max", "min" or "product". Numbers come back as Python numbers.
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce(op={op!r}) is not supported: use one of {', '.join(_REDUCE_OPS)}")
    is_number = not isinstance(x, torch.Tensor)
    if is_number:
        x = torch.tensor(x, dtype=torch.float64 if isinstance(x, float) or op == "mean" else torch.int64)
    if not is_distributed():
        result = x.clone()
        if op == "mean" and not result.is_floating_point():
            result = result.double()
    else:
        where = _collective_device()
        result = x.detach().to(where, copy=True)
        if op == "mean" and not result.is_floating_point():
            result = result.double()
        dist.all_reduce(result, op=_REDUCE_OPS[op])
        if op == "mean":
            result /= get_world_size()
        result = result.to(x.device)
    return result.item() if is_number else result
