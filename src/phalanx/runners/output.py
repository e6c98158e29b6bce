"""Forwarding a rank's stdout and stderr to the caller, a whole line at a time, with its rank.

Lines are written to the caller's `sys.stdout` / `sys.stderr` as they are at the time of the
write, so that they land in a notebook cell or a test's captured output, not only on a terminal.
With `Platform.rank_logs` (torchrun's --log-dir, --redirects, --tee), streams also go to log
files laid out as torchrun lays them out:

    <run folder>/attempt_<n>/<local rank>/stdout.log, stderr.log
    <run folder>/attempt_<n>/filtered_stdout.log, filtered_stderr.log   (--duplicate-*-filters)

Each file is created new (`O_EXCL|O_NOFOLLOW`, the user's umask): nothing planted is written through.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections import deque
from pathlib import Path

from phalanx.files import create_exclusive
from phalanx.platform import Platform

__all__ = ["RankOutput", "new_run_folder", "rank_outputs"]

_USER_MODE = 0o666  # the umask makes it the user's usual permissions, as for any file they write
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

_TAIL_LINES = 60


class RankOutput:
    """One stream of one rank: splits bytes into lines, prefixes and shows them, keeps a tail."""

    def __init__(
        self,
        rank: int,
        stream_name: str,
        show: bool,
        prefix: bool,
        log_file: io.RawIOBase | None = None,
        filtered_file: io.RawIOBase | None = None,
        line_filters: tuple[str, ...] = (),
    ) -> None:
        """`log_file` gets every byte as it comes; `filtered_file` the lines that contain one of `line_filters`."""
        self.stream_name = stream_name
        self.show = show
        self.prefix = f"[rank {rank}] " if prefix else ""
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._partial = b""
        self._captured: bytearray | None = None
        self._log_file = log_file
        self._filtered_file = filtered_file if line_filters else None
        self._line_filters = line_filters

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
        _write_file(self._log_file, data)
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
        for file in (self._log_file, self._filtered_file):
            if file is not None:
                with contextlib.suppress(OSError):
                    file.close()

    def _emit(self, raw_lines: list[bytes]) -> None:
        # Of a line redrawn with carriage returns, only its last state is kept.
        lines = [line.decode("utf-8", errors="replace").rstrip("\r").rsplit("\r", 1)[-1] for line in raw_lines]
        self.tail.extend(lines)
        self._write("".join(f"{self.prefix}{line}\n" for line in lines))
        if self._filtered_file is not None:
            kept = [line for line in lines if any(needle in line for needle in self._line_filters)]
            if kept:
                _write_file(self._filtered_file, "".join(f"{self.prefix}{line}\n" for line in kept).encode())

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


def _write_file(file: io.RawIOBase | None, data: bytes) -> None:
    if file is None or file.closed:
        return
    try:
        view = memoryview(data)
        while view:
            view = view[file.write(view) :]
    except (OSError, ValueError):  # a full disk must not break the launch: the console still has it
        pass


def new_run_folder(log_dir: str | os.PathLike | None, run_id: str) -> str:
    """A new folder for one run's log files, as torchrun makes it: `<log_dir>/<run_id>_<random>`.

    `log_dir` is created if missing; None: a new temporary folder (`phalanx_*`, torchrun's is
    `torchelastic_*`). The run's folder is private (0700), as torchrun's `mkdtemp` makes it.
    """
    base = os.fspath(log_dir) if log_dir is not None else tempfile.mkdtemp(prefix="phalanx_")
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{run_id}_", dir=base)


def _new_rank_folder(run_folder: Path, local_rank: int) -> Path:
    """`attempt_<n>/<local rank>` for this start of the ranks: the first attempt without this rank's folder.

    Every start of the ranks makes a folder for each local rank, so the n-th start finds
    attempts 0 to n-1 taken (torchrun numbers them by its restart count).
    """
    attempt = 0
    while True:
        attempt_folder = run_folder / f"attempt_{attempt}"
        attempt_folder.mkdir(parents=True, exist_ok=True)
        try:
            (attempt_folder / str(local_rank)).mkdir()
        except FileExistsError:
            attempt += 1
            continue
        return attempt_folder / str(local_rank)


def _open_log(path: Path) -> io.RawIOBase:
    return io.FileIO(create_exclusive(path, _USER_MODE), "wb", closefd=True)


def _open_shared_log(path: Path) -> io.RawIOBase:
    """A file every rank of an attempt appends to: the first creates it (exclusively), the others open it."""
    flags = os.O_WRONLY | os.O_APPEND | _NOFOLLOW | _CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, _USER_MODE)
    except FileExistsError:
        fd = os.open(path, flags)
    return io.FileIO(fd, "wb", closefd=True)


def rank_outputs(rank: int, platform: Platform) -> tuple[RankOutput, RankOutput]:
    """A rank's stdout and stderr: shown and prefixed as `platform` asks, logged as its `rank_logs` asks."""
    logs = platform.rank_logs
    local_rank = rank - platform.node_rank * (platform.n_procs or 1)
    rank_folder = _new_rank_folder(Path(logs.folder), local_rank) if logs.folder is not None else None
    outputs = []
    for stream in ("stdout", "stderr"):
        show = platform.console_logs and logs.to_console(local_rank, stream)
        log_file = filtered_file = None
        line_filters = logs.line_filters(local_rank, stream)
        if rank_folder is not None and logs.to_file(local_rank, stream):
            log_file = _open_log(rank_folder / f"{stream}.log")
        if rank_folder is not None and line_filters:
            filtered_file = _open_shared_log(rank_folder.parent / f"filtered_{stream}.log")
        outputs.append(RankOutput(rank, stream, show, platform.rank_prefix, log_file, filtered_file, line_filters))
    return outputs[0], outputs[1]
