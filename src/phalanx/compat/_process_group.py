"""A process group for straight-line scripts that state their own place: "I am rank r of n".

pyTAGI (`DDPConfig(rank=..., world_size=...)`) and PopTorch (`configureProcessId(id, n)`) let
a script say where it stands and then train in plain top-level code, with no function to
launch. phalanx's groups live inside `px.launch`; so `join` runs a launch in a background
thread whose function only waits until this process exits, and the script's own code uses
the group meanwhile: torch's default group belongs to the process, not to a thread.

Who started the process decides how the ranks meet, always through `px.launch`:
- inside a launch already (or `phalanx run`): the group exists; the stated place is checked;
- under mpirun, srun or torchrun: phalanx joins the launcher's processes;
- started by hand (a `multiprocessing` loop, two terminals): the stated place becomes an
  `Explicit` environment, `Platform(environment=Explicit(rank, world_size))`, and the launch
  joins it; nothing is written into os.environ beyond what every rank gets for the duration
  of the launch (RANK, LOCAL_RANK, WORLD_SIZE, ...). Without MASTER_ADDR/MASTER_PORT they
  meet at 127.0.0.1:29500 (torchrun's default port); a rank whose rank 0 never shows up
  there fails within `Platform.connect_timeout`.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import os
import sys
import threading
import weakref
from collections.abc import Callable

import phalanx as px
from phalanx import variables
from phalanx.environment import Explicit

__all__ = ["before_leaving", "join"]

# At exit, how long a process waits for the others to leave the group too. Bounded: a process
# that failed without the interpreter noticing (multiprocessing catches its exception) must
# not wait for peers stuck in another collective; leaving without them is harmless.
_EXIT_WAIT_SECONDS = 30.0
# Where processes started by hand meet when MASTER_PORT is not set: torchrun's default port,
# the same in every terminal (a port derived from the parent process would differ between
# two terminals, and each process would wait for the other at its own port).
DEFAULT_MASTER_PORT = Explicit.DEFAULT_PORT


class _HeldLaunch:
    """A `px.launch` in a thread, holding this process's rank until `release`."""

    def __init__(self, platform: px.Platform) -> None:
        self.platform = platform
        self.joined = threading.Event()
        self.released = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="phalanx-compat-group", daemon=True)

    def _run(self) -> None:
        try:
            px.launch(self._hold, platform=self.platform)
        except BaseException as error:  # read by the thread that asked to join
            self.error = error
        finally:
            self.joined.set()

    def _hold(self) -> None:
        self.joined.set()
        self.released.wait()

    def release(self) -> None:
        """At exit: leave the group together with the other ranks (bounded: a rank may be gone)."""
        if getattr(sys, "last_value", None) is not None:
            return  # the script died of an exception: the others learn it from the closed connections
        # A DDP wrapper still alive keeps the group's worker threads alive past the launch's
        # destroy_process_group; one of them may then touch a Python object while the
        # interpreter finalises, which aborts the process. Drop the wrappers while the group
        # still stands, so that the launch's destroy is the group's last reference.
        for callback in _leaving:
            method = callback()
            if method is not None:
                method()
        gc.collect()  # DDP modules sit in reference cycles
        self.released.set()
        self.thread.join(_EXIT_WAIT_SECONDS)


_held: _HeldLaunch | None = None
_leaving: list[weakref.WeakMethod] = []


def before_leaving(method: Callable[[], None]) -> None:
    """Have the bound `method` run at exit before this process leaves a joined group (to drop a DDP wrapper)."""
    _leaving.append(weakref.WeakMethod(method))


def _stated_by_hand(rank: int, world_size: int) -> Explicit:
    """The place of a process started by hand; LOCAL_WORLD_SIZE and LOCAL_RANK, set by hand, say its node's share."""
    local: dict[str, int] = {}
    for name, key in ((variables.LOCAL_WORLD_SIZE, "local_world_size"), (variables.LOCAL_RANK, "local_rank")):
        if name in os.environ:
            try:
                local[key] = int(os.environ[name])
            except ValueError:
                raise px.PlatformError(
                    key, os.environ[name], "it must be a whole number", f"Set {name} to one, or unset it.", "Explicit"
                ) from None
    return Explicit(rank, world_size, **local)


def join(rank: int, world_size: int, platform: Callable[[], px.Platform], stated: str) -> None:
    """Make this process rank `rank` of `world_size` until it exits; `stated` names the call, for errors.

    `platform()` is built only when a group must be joined: inside a launch, the launch's
    platform stands. World size 1 needs no group: phalanx's helpers answer as rank 0 of 1.
    """
    global _held
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{stated}: {name}={value!r} must be a whole number >= 0")
    if world_size < 1 or rank >= world_size:
        raise ValueError(f"{stated}: rank {rank} of world size {world_size} is impossible (0 <= rank < world size)")
    current = (px.get_rank(), px.get_world_size())
    if px.is_distributed() or _held is not None or current[1] > 1:
        # In a launch, a joined group, or under a launcher: its places are the truth.
        if (rank, world_size) != current:
            raise px.PhalanxError(
                f"{stated} says rank {rank} of {world_size}, but this process is rank {current[0]} of "
                f"{current[1]} (its launch or launcher decides). Pass px.get_rank() and px.get_world_size(), "
                "or the launcher's rank and size (OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE under mpirun)."
            )
        if px.is_distributed() or _held is not None or world_size == 1:
            return
        environment = None  # the launcher's: detected
    elif world_size == 1:
        return
    else:
        environment = _stated_by_hand(rank, world_size)
    # DDP's first construction imports torch.distributed.fsdp, and that import, made while a
    # group exists, keeps the group alive after destroy_process_group (torch 2.13): its
    # threads then outlive the launch and one may touch Python while the interpreter
    # finalises, which aborts the process. Imported before the group exists, it holds nothing.
    import torch.distributed.fsdp  # noqa: F401

    held = _HeldLaunch(dataclasses.replace(platform(), cluster="env", environment=environment))
    held.thread.start()
    held.joined.wait()
    if held.error is not None:
        raise held.error
    _held = held
    atexit.register(held.release)
