"""Hang reports: where every rank is when a job stops progressing, and which ranks never arrived.

A rank is "waiting" when its stack (a faulthandler dump of a live rank, or the traceback of a
rank whose collective timed out) shows a torch.distributed collective; a live rank that is
elsewhere never arrived. The report puts that verdict first and every rank's stack after it.

The stacks come in three shapes, all read here:

- a faulthandler dump (`faulthandler.register(..., all_threads=True)`), newest frame first, one
  block per thread under a "Thread 0x..." or "Current thread 0x..." line, the other threads
  first and the main thread last: `  File "train.py", line 12 in step`;
- `traceback.format_list` of one thread, reversed (newest first, no thread lines):
  `  File "train.py", line 12, in step` followed by the source line;
- a Python traceback, oldest frame first, possibly several chained ones one after the other.
"""

from __future__ import annotations

import re

from phalanx.errors import RankFailure

__all__ = ["collective_in", "hang_verdict", "innermost_frame", "looks_like_timeout", "trim_dump"]

# "File ".../distributed_c10d.py", line 3252, in all_reduce" (traceback) or "... line 3252 in all_reduce" (faulthandler)
_COLLECTIVE_FRAME = re.compile(r'distributed_c10d\.py", line \d+,? in (\w+)')
# distributed_c10d.py functions that answer at once (get_rank, is_initialized...): never a wait
_QUERY = re.compile(r"(get|is)_\w+")
_TIMEOUT_SIGNS = re.compile(r"timed out|timeout|time out|watchdog caught collective operation", re.IGNORECASE)
_FRAME = re.compile(r'File "([^"]+)", line (\d+),? in (\S+)')
_THREAD_HEADER = re.compile(r"(Current thread|Thread) 0x[0-9a-fA-F]+ |Stack \(most recent call first\)")
# phalanx's own call of the rank's function: a frame in a phalanx package folder (wherever it is
# installed, on whichever node), not a user's function that has the same name
_PHALANX_ENTRY = re.compile(r'[/\\]phalanx[/\\][^"]*", line \d+,? in (call_rank_function|run_rank)\b')
_LEADING_BLANK_LINES = re.compile(r"\A\s*\n")
_CHAINED = re.compile(r"^Traceback \(most recent call last\):$", re.MULTILINE)


def looks_like_timeout(failure: RankFailure) -> bool:
    """A collective or store operation that gave up waiting: the sign that some rank hangs.

    gloo and the store raise an exception that says so; NCCL's watchdog aborts the process
    (SIGABRT) after writing it to stderr.
    """
    if failure.exc_type:
        return bool(_TIMEOUT_SIGNS.search(failure.message))
    return failure.signal_name == "SIGABRT" and bool(_TIMEOUT_SIGNS.search(failure.output_tail))


def _threads(dump: str) -> list[str]:
    """A dump's thread blocks, the main thread's first; a stack without thread lines is one block.

    faulthandler lists the newest thread first, so the main thread is the last block (also when
    the signal was handled on another thread, which faulthandler then calls the current one).
    """
    blocks: list[list[str]] = []
    for line in dump.splitlines():
        if not blocks or _THREAD_HEADER.match(line):
            blocks.append([])
        blocks[-1].append(line)
    threads = ["\n".join(block) for block in blocks]
    return threads[-1:] + threads[-2::-1]


def collective_in(stack: str, newest_first: bool) -> str | None:
    """The torch.distributed collective a stack is inside (all_reduce, barrier...), or None.

    It is the outermost torch.distributed frame, the function that torch's user called: the
    collectives that torch builds from others (all_gather_object runs all_gather twice) are
    named as called. The main thread is looked at first, then the others; of chained tracebacks
    (`newest_first=False`), the last that has one.
    """
    parts = _threads(stack) if newest_first else _CHAINED.split(stack)[::-1]
    for part in parts:
        names = _COLLECTIVE_FRAME.findall(part)
        outermost = (names[-1] if newest_first else names[0]) if names else None
        if outermost is not None and not _QUERY.fullmatch(outermost):
            return outermost
    return None


def innermost_frame(stack: str) -> str:
    """Where a newest-first stack's main thread is: "still running, at train.py:12 in step"."""
    for thread in _threads(stack):
        match = _FRAME.search(thread)
        if match is not None:
            path, line, function = match.groups()
            return f"still running, at {path}:{line} in {function}"
    return "still running"


def trim_dump(dump: str) -> str:
    """A newest-first stack without phalanx's own frames below the user's function, per thread."""
    kept, skipping = [], False
    for line in dump.splitlines():
        if _THREAD_HEADER.match(line):
            skipping = False
        elif _PHALANX_ENTRY.search(line):
            skipping = True
        if not skipping:
            kept.append(line)
    return _LEADING_BLANK_LINES.sub("", "\n".join(kept)).rstrip()  # the first frame keeps its indent


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
