"""What this process knows of its rank while it is one, and what must run when its function ends.

The worker entry (`phalanx.runners.worker.rank_session`) enters a `RankPlace` when a rank is
set up and leaves it at the end; the rank helpers (`phalanx.dist`) read it. Outside a launch
there is no place, and the helpers fall back to the launcher's variables or to world size 1.

`on_rank_finish` is the hook for work that must be over before a rank's outcome is reported:
a `Context` waits there for its background checkpoint write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "RankPlace",
    "allow_lazy_group",
    "call_rank_function",
    "current_place",
    "enter_rank",
    "join_lazy_group",
    "leave_rank",
    "on_rank_finish",
]


@dataclass(frozen=True)
class RankPlace:
    """A rank's device and its place on its node, as the worker entry set them up."""

    device: torch.device
    local_rank: int
    local_world_size: int
    node_rank: int


_place: RankPlace | None = None
_finishers: list[Callable[[], None]] = []
_lazy_group: tuple[str, timedelta] | None = None  # (backend, timeout) under `phalanx run`


def enter_rank(place: RankPlace) -> None:
    """This process is a rank now (called by the worker entry, once the group exists)."""
    global _place
    _place = place


def leave_rank() -> None:
    """This process is no rank any more (the caller's own rank ends, a worker winds down)."""
    global _place, _lazy_group
    _place = None
    _lazy_group = None


def allow_lazy_group(backend: str, timeout: timedelta) -> None:
    """Under `phalanx run`: no group yet; `join_lazy_group` makes one (env://) when one is needed."""
    global _lazy_group
    _lazy_group = (backend, timeout)


def join_lazy_group() -> bool:
    """Make this rank's process group now, if `phalanx run` left it to be made on first use.

    The script may have made it already (`init_process_group()`): then that one stands. Joins
    with torch's env:// convention, through the variables torchrun's agent sets, so that ranks
    whose script makes the group itself and ranks whose helpers make it meet alike. True when
    a group exists afterwards.
    """
    if dist.is_initialized():
        return True
    if _lazy_group is None:
        return False
    backend, timeout = _lazy_group
    dist.init_process_group(backend, init_method="env://", timeout=timeout)
    return True


def current_place() -> RankPlace | None:
    """The rank this process is now, or None outside a launched rank."""
    return _place


def on_rank_finish(callback: Callable[[], None]) -> None:
    """Have `callback` run when a rank's function ends, before its value or failure is reported.

    Registering the same callback twice runs it once. A `Context` registers the wait for its
    background checkpoint write this way, so that the caller never sees a rank finish with its
    last checkpoint still in flight.
    """
    if callback not in _finishers:
        _finishers.append(callback)


def call_rank_function(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """Run a rank's function, then what must finish before its outcome is reported."""
    try:
        value = fn(*args, **kwargs)
    except BaseException:
        for finish in _finishers:
            try:
                finish()
            except BaseException:  # the function's own failure is the one to report
                pass
        raise
    for finish in _finishers:
        finish()
    return value
