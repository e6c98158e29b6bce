"""Hang reports: where every rank is when a job stops progressing, and which ranks never arrived.

A rank is "waiting" when its stack (a faulthandler dump of a live rank, or the traceback of a
rank whose collective timed out) shows a torch.distributed collective; a live rank that is
elsewhere never arrived. The report puts that verdict first and every rank's stack after it.
"""

from __future__ import annotations

import re

from phalanx.errors import RankFailure

__all__ = ["collective_in", "hang_verdict", "innermost_frame", "looks_like_timeout", "trim_dump"]

# "File ".../distributed_c10d.py", line 3252, in all_reduce" (traceback) or "... line 3252 in all_reduce" (faulthandler)
_COLLECTIVE_FRAME = re.compile(r'distributed_c10d\.py", line \d+,? in (\w+)')
_TIMEOUT_SIGNS = re.compile(r"timed out|timeout|time out|watchdog caught collective operation", re.IGNORECASE)
_FRAME = re.compile(r'File "([^"]+)", line (\d+),? in (\S+)')
_PHALANX_ENTRY = re.compile(r"in (call_rank_function|run_rank)\b")


def looks_like_timeout(failure: RankFailure) -> bool:
    """A collective or store operation that gave up waiting: the sign that some rank hangs.

    gloo and the store raise an exception that says so; NCCL's watchdog aborts the process
    (SIGABRT) after writing it to stderr.
    """
    if failure.exc_type:
        return bool(_TIMEOUT_SIGNS.search(failure.message))
    return failure.signal_name == "SIGABRT" and bool(_TIMEOUT_SIGNS.search(failure.output_tail))


def collective_in(stack: str, newest_first: bool) -> str | None:
    """The torch.distributed collective a stack is inside (all_reduce, barrier...), or None."""
    names = _COLLECTIVE_FRAME.findall(stack)
    if not names:
        return None
    return names[0] if newest_first else names[-1]


def innermost_frame(stack: str) -> str:
    """Where a newest-first stack is: "still running, at train.py:12 in step"."""
    match = _FRAME.search(stack)
    if match is None:
        return "still running"
    path, line, function = match.groups()
    return f"still running, at {path}:{line} in {function}"


def trim_dump(dump: str) -> str:
    """A faulthandler dump without phalanx's own frames below the user's function, per thread."""
    kept, skipping = [], False
    for line in dump.splitlines():
        if line.startswith(("Thread 0x", "Current thread 0x")):
            skipping = False
        elif _PHALANX_ENTRY.search(line):
            skipping = True
        if not skipping:
            kept.append(line)
    return "\n".join(kept).strip()


def hang_verdict(
    world_ranks: list[int],
    waiting: dict[int, str],
    elsewhere: dict[int, str],
) -> str:
    """One paragraph: who waits in which collective, who never arrived and where it is."""
    lines = []
    for name in sorted(set(waiting.values())):
        ranks = [rank for rank, collective in sorted(waiting.items()) if collective == name]
        lines.append(f"rank(s) {ranks} waited in {name}")
    if len(set(waiting.values())) > 1:
        lines.append("the ranks called different collectives: every rank must call the same ones in the same order")
    missing = [rank for rank in world_ranks if rank not in waiting]
    if missing and waiting:
        lines.append(f"rank(s) {missing} never arrived")
    for rank, where in sorted(elsewhere.items()):
        lines.append(f"rank {rank}: {where}")
    return "; ".join(lines)
