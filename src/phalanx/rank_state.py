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
from typing import Any

import torch

__all__ = ["RankPlace", "call_rank_function", "current_place", "enter_rank", "leave_rank", "on_rank_finish"]


@dataclass(frozen=True)
class RankPlace:
    """A rank's device and its place on its node, as the worker entry set them up."""

    device: torch.device
    local_rank: int
    local_world_size: int
    node_rank: int


_place: RankPlace | None = None
_finishers: list[Callable[[], None]] = []


def enter_rank(place: RankPlace) -> None:
    """This process is a rank now (called by the worker entry, once the group exists)."""
    global _place
    _place = place


def leave_rank() -> None:
    """This process is no rank any more (the caller's own rank ends, a worker winds down)."""
    global _place
    _place = None


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
