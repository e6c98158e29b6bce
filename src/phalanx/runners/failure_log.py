"""The failure log of one job: every rank's failure, the cause first, and exits that are not failures.

Failures arrive from several places (a rank's own report, its exit status, the caller's own
rank, the hang watch) and in any order; the cause is the earliest by time, and an error that
only says a peer went away comes after every other (see `WorkerError`). An exit by the signal
phalanx sent to stop the ranks after a failure is that failure's consequence, not a failure.
"""

from __future__ import annotations

from collections.abc import Callable

from phalanx.errors import RankFailure
from phalanx.runners.processes import crash_report, describe_exit

__all__ = ["FailureLog", "causes_first"]


def causes_first(failures: list[RankFailure]) -> list[RankFailure]:
    """Failures read together, in the order to handle them: causes before lost peers, then by time.

    A rank whose collective timed out reports it before its exit makes the others lose their
    peer, and the timeout must start the hang report.
    """
    return sorted(failures, key=lambda failure: (failure.lost_a_peer, failure.time))


class FailureLog:
    """The failures recorded so far (callers hold the job's lock around it)."""

    def __init__(self) -> None:
        self.failures: list[RankFailure] = []

    def __bool__(self) -> bool:
        return bool(self.failures)

    def add(self, failure: RankFailure) -> None:
        self.failures.append(failure)

    def has_failed(self, rank: int) -> bool:
        return any(failure.rank == rank for failure in self.failures)

    def first(self) -> RankFailure:
        """The earliest failure by time: the cause."""
        return min(self.failures, key=lambda failure: failure.time)

    def ranks(self) -> set[int]:
        return {failure.rank for failure in self.failures}

    @staticmethod
    def from_exit(
        rank: int, status: int, when: float, stderr_tail: str, stopped_by_us: Callable[[str | None, float], bool]
    ) -> RankFailure | None:
        """The failure a worker's exit stands for, or None when phalanx stopped it itself.

        `stopped_by_us(signal_name, when)` says whether that signal, at that time, was phalanx's.
        """
        description, code, signal_name = describe_exit(status)
        if stopped_by_us(signal_name, when):
            return None  # phalanx stopped it after another rank failed: not a failure of its own
        return RankFailure(
            rank=rank,
            exc_type="",
            message=description,
            traceback=crash_report(stderr_tail),
            time=when,
            exit_code=code,
            signal_name=signal_name,
            output_tail=stderr_tail,
        )
