"""DDPW's front door: `Wrapper(platform).start(task, args)` and the `@wrapper(platform)` decorator.

DDPW calls `task(global_rank, local_rank, process_group, args)` on every rank; so does this,
with the launch, the failure reports and the clean-up of `phalanx.launch` underneath.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from phalanx.dist import get_local_rank, get_rank
from phalanx.launch import launch
from phalanx.platform import Platform

__all__ = ["Wrapper", "wrapper"]


def _ddpw_task(task: Callable[..., Any], args: Any) -> Any:
    return task(get_rank(), get_local_rank(), dist.group.WORLD, args)


def _call_undecorated(decorated: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    return decorated.__wrapped__(*args, **kwargs)


class Wrapper:
    """Runs DDPW-style tasks on a platform.

    Example::

        def task(global_rank, local_rank, process_group, args):
            print(f"rank {global_rank} of {process_group.size()}: {args}")

        Wrapper(Platform(device="cpu", n_procs=2)).start(task, ("example",))
    """

    def __init__(self, platform: Platform | None = None) -> None:
        self.platform = platform or Platform()

    def start(self, task: Callable[..., Any], args: Any = None) -> list[Any]:
        """Call `task(global_rank, local_rank, process_group, args)` on every rank; returns the values."""
        return launch(_ddpw_task, task, args, platform=self.platform)


def wrapper(platform: Platform | None = None) -> Callable[[Callable[..., Any]], Callable[..., list[Any]]]:
    """Decorator: calling the decorated function runs it on every rank of `platform`.

    Example::

        @wrapper(Platform(device="cpu", n_procs=2))
        def run(a, b):
            return a + b

        run(1, 2)  # [3, 3]
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., list[Any]]:
        @functools.wraps(fn)
        def launched(*args: Any, **kwargs: Any) -> list[Any]:
            # `launched` itself travels: a module-level `fn` is pickled by name, and that
            # name now means `launched`, so each rank unwraps it instead of launching again.
            return launch(_call_undecorated, launched, args, kwargs, platform=platform)

        return launched

    return decorate
