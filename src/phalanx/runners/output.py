"""Forwarding a rank's stdout and stderr to the caller, a whole line at a time, with its rank.

Lines are written to the caller's `sys.stdout` / `sys.stderr` as they are at the time of the
write, so that they land in a notebook cell or a test's captured output, not only on a terminal.
"""

from __future__ import annotations

import sys
from collections import deque

from phalanx.platform import Platform

__all__ = ["RankOutput", "rank_outputs"]

_TAIL_LINES = 60


class RankOutput:
    """One stream of one rank: splits bytes into lines, prefixes and shows them, keeps a tail."""

    def __init__(self, rank: int, stream_name: str, show: bool, prefix: bool) -> None:
        self.stream_name = stream_name
        self.show = show
        self.prefix = f"[rank {rank}] " if prefix else ""
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._partial = b""
        self._captured: bytearray | None = None

    def start_capture(self) -> None:
        """Keep what arrives from now on instead of showing it (a stack dump the caller asked for)."""
        self._captured = bytearray()

    def stop_capture(self) -> str:
        text = bytes(self._captured or b"").decode("utf-8", errors="replace")
        self._captured = None
        return text

    @property
    def captured_anything(self) -> bool:
        return bool(self._captured)

    def feed(self, data: bytes) -> None:
        if self._captured is not None:
            self._captured += data
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if lines:
            self._emit(lines)
        if b"\r" in self._partial:  # a progress bar redrawing its line: show it now, in place
            *redraws, self._partial = self._partial.split(b"\r")
            self._redraw(redraws[-1] if redraws[-1] else b"")

    def close(self) -> None:
        if self._partial:
            self._emit([self._partial])
            self._partial = b""

    def _emit(self, raw_lines: list[bytes]) -> None:
        # Of a line redrawn with carriage returns, only its last state is kept.
        lines = [line.decode("utf-8", errors="replace").rstrip("\r").rsplit("\r", 1)[-1] for line in raw_lines]
        self.tail.extend(lines)
        self._write("".join(f"{self.prefix}{line}\n" for line in lines))

    def _redraw(self, raw: bytes) -> None:
        if raw:
            self._write(f"\r{self.prefix}{raw.decode('utf-8', errors='replace')}")

    def _write(self, text: str) -> None:
        if not self.show:
            return
        stream = getattr(sys, self.stream_name)
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):  # a closed or broken console must not break the launch
            pass

    def tail_text(self) -> str:
        return "\n".join(self.tail)


def rank_outputs(rank: int, platform: Platform) -> tuple[RankOutput, RankOutput]:
    """A rank's stdout and stderr, shown (or not) and prefixed as `platform` asks."""
    show, prefix = platform.console_logs, platform.rank_prefix
    return RankOutput(rank, "stdout", show, prefix), RankOutput(rank, "stderr", show, prefix)
