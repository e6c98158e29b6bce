"""Stop signals as exceptions: SIGTERM and SIGHUP end a launch the way Ctrl-C does.

`docker stop`, systemd and `scancel` send SIGTERM; a closed terminal sends SIGHUP. Inside
`stop_signals_raise()`, each raises `StopSignal` (a `KeyboardInterrupt`) in the main thread,
so every runner stops its ranks exactly as for Ctrl-C, forwarding the same signal to them.
The exit code of a process that ends so is 128 + the signal's number, as torchrun's is.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["FORWARDED_SIGNALS", "StopSignal", "exit_code_for", "signal_of", "stop_signals_raise"]

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopSignal(KeyboardInterrupt):
    """This process received `signum` (SIGTERM, SIGHUP, or SIGINT: Ctrl-C) and is stopping."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"received {signal.Signals(self.signum).name}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def signal_of(interruption: KeyboardInterrupt) -> int:
    """The signal an interruption stands for: its own, or SIGINT for a plain KeyboardInterrupt."""
    return interruption.signum if isinstance(interruption, StopSignal) else int(signal.SIGINT)


def exit_code_for(signum: int) -> int:
    """A shell's exit code for a process ended by `signum`: 128 + its number (130 for SIGINT)."""
    return 128 + int(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While inside: SIGTERM, SIGINT and SIGHUP raise `StopSignal` in the main thread.

    Outside the main thread (where Python cannot install handlers) it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_stop(signum: int, frame: FrameType | None) -> None:
        raise StopSignal(signum)

    previous = {signum: signal.signal(signum, raise_stop) for signum in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
