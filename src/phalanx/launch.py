"""`launch`: run one function on every rank of a platform and bring every result back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from phalanx.errors import LaunchError, PlatformError
from phalanx.platform import Platform

__all__ = ["launch"]

T = TypeVar("T")


def launch(
    fn: Callable[..., T],
    *args: Any,
    platform: Platform | None = None,
    caller_rank: int | None = None,
    gather: bool = True,
    **kwargs: Any,
) -> list[T] | T:
    """Run `fn(*args, **kwargs)` on every rank of `platform`; return the values by global rank.

    `platform` defaults to `Platform()`: the best available device, one rank per visible GPU
    (or one CPU process).
    `caller_rank=k` makes the calling process rank k: it runs `fn` itself, so its objects stay
    here (notebooks). `gather=False` returns rank 0's value alone. A failing rank raises
    `WorkerError` with the remote traceback, after every other rank has been stopped.

    Example::

        def train(scale):
            return px.get_rank() * scale

        px.launch(train, 10, platform=px.Platform(device="cpu", n_procs=4))  # [0, 10, 20, 30]
    """
    if not callable(fn):
        raise TypeError(f"launch() needs a callable first, got {fn!r}")
    platform = (platform or Platform()).resolve()
    if caller_rank is not None and not (
        isinstance(caller_rank, int) and 0 <= caller_rank < platform.n_procs and platform.node_rank == 0
    ):
        raise PlatformError(
            "caller_rank",
            caller_rank,
            f"it must be a rank on this node, between 0 and {platform.n_procs - 1}, or None",
            owner="launch",
        )
    if platform.cluster == "local":
        if platform.n_nodes > 1:
            raise LaunchError(
                f"n_nodes={platform.n_nodes}: several nodes without a scheduler are not supported yet; "
                "run with n_nodes=1"
            )
        from phalanx.runners.local import run_local

        return run_local(fn, args, kwargs, platform, caller_rank, gather)
    raise LaunchError(
        f"cluster={platform.cluster!r} is not supported yet in this version of phalanx; "
        "use cluster='local' (the default on a single machine)"
    )
