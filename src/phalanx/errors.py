"""The exception hierarchy: every error phalanx raises is a `PhalanxError`.

Messages say what went wrong, with the offending value, and what to do about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "CheckpointError",
    "HangError",
    "LaunchError",
    "PhalanxError",
    "PlatformError",
    "RankFailure",
    "SerializationError",
    "UntrustedFileError",
    "WorkerError",
]


class PhalanxError(Exception):
    """Base class of every error raised by phalanx."""


class PlatformError(PhalanxError, ValueError):
    """A `Platform` field has a value that cannot work; the message names the field and the fix."""

    def __init__(self, field_name: str, value: object, allowed: str, fix: str = "", owner: str = "Platform") -> None:
        self.field = field_name
        self.value = value
        message = f"{owner}({field_name}={value!r}) is not valid: {allowed}."
        if fix:
            message += f" {fix}"
        super().__init__(message)


class LaunchError(PhalanxError, RuntimeError):
    """The processes could not be started, or could not meet."""


class CheckpointError(PhalanxError):
    """A checkpoint cannot be written or read: missing, truncated, corrupt, or carrying code."""


class UntrustedFileError(PhalanxError, PermissionError):
    """A file phalanx would read back could have been written by someone else: it is refused unread.

    Raised for a file not owned by this user, a symbolic link, or a file in a folder that other
    users can write (group- or world-writable without the sticky bit, or owned by another user).
    """


class SerializationError(PhalanxError, TypeError):
    """The function, an argument or a return value cannot travel between processes."""


# What a backend says when a peer vanished: such an error is the consequence of another
# rank's failure, even when it was raised before that rank's death could be observed.
_PEER_LOSS_SIGNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Read error",
    "remote worker",
    "NCCL communicator was aborted",
)


@dataclass(frozen=True)
class RankFailure:
    """What one failed rank left behind: a Python exception or an abnormal exit.

    `time` is the wall-clock time of the failure (seconds since the epoch); the earliest
    failure is the root cause, whatever order the reports arrived in.
    """

    rank: int
    exc_type: str
    message: str
    traceback: str
    time: float
    exit_code: int | None = None
    signal_name: str | None = None
    output_tail: str = field(default="", repr=False)
    during: str = "run"  # "setup": before the function started (unpickling, joining the group)

    @classmethod
    def from_record(cls, record: dict) -> RankFailure:
        """Build one from the plain record a rank sends (see `phalanx.runners.worker.failure_record`)."""
        return cls(
            rank=record["rank"],
            exc_type=record["exc_type"],
            message=record["message"],
            traceback=record["traceback"],
            time=record["time"],
            during=record.get("during", "run"),
        )

    @property
    def lost_a_peer(self) -> bool:
        """True when this failure only reports that another rank went away."""
        return bool(self.exc_type) and any(sign in self.message for sign in _PEER_LOSS_SIGNS)

    def summary(self) -> str:
        if self.exc_type:
            return f"rank {self.rank} raised {self.exc_type}: {self.message}"
        return f"rank {self.rank} {self.message}"


class WorkerError(PhalanxError, RuntimeError):
    """A rank failed. The first failure is the cause; `.failures` lists them all, cause first.

    Failures are ordered by time, except that an error which only reports a lost peer (gloo's
    "Connection closed by peer") comes after every other failure: it is their consequence.

    Attributes: `rank`, `exc_type` (the name of the remote exception type, or "" for a rank
    that died without raising), `traceback` (the remote traceback as text), `exit_code`,
    `signal_name` and `failures` (every failed rank, first failure first).
    """

    attempts: list[WorkerError] = []  # with Platform(max_restarts=k): every attempt's error, this one last

    def __init__(self, failures: list[RankFailure]) -> None:
        if not failures:
            raise ValueError("WorkerError needs at least one failure")
        self.failures = sorted(failures, key=lambda failure: (failure.lost_a_peer, failure.time))
        first = self.failures[0]
        self.rank = first.rank
        self.exc_type = first.exc_type
        self.traceback = first.traceback
        self.exit_code = first.exit_code
        self.signal_name = first.signal_name
        super().__init__(self._describe())

    def _describe(self) -> str:
        first = self.failures[0]
        lines = [first.summary()]
        others = [f.rank for f in self.failures[1:]]
        if others:
            lines[0] += f" (ranks {others} failed after it)"
        if first.traceback:
            lines += ["", f"Traceback from rank {first.rank}:", first.traceback.rstrip()]
        elif first.output_tail:
            lines += ["", f"Last output of rank {first.rank}:", first.output_tail.rstrip()]
        return "\n".join(lines)

    def after_restarts(self, earlier: list[WorkerError]) -> WorkerError:
        """This error as the last of several attempts: its message lists every attempt's failure."""
        self.attempts = [*earlier, self]
        lines = [f"the job failed {len(self.attempts)} times (1 try and {len(earlier)} restart(s)):"]
        for number, attempt in enumerate(self.attempts, start=1):
            lines.append(f"  attempt {number}: {attempt.failures[0].summary().splitlines()[0]}")
        self.args = ("\n".join(lines) + "\n\nThe last attempt: " + self._describe(),)
        return self

    def __reduce__(self):  # keep the failures (and the attempts) when the error itself is pickled
        return (type(self), (self.failures,), {"attempts": self.attempts, "args": self.args})

    def __setstate__(self, state: dict) -> None:
        self.attempts = state["attempts"]
        self.args = state["args"]


class HangError(WorkerError):
    """The job stopped progressing: a collective some rank never joined, or a rank stuck.

    Raised after `Platform(timeout=...)` ran out. On top of `WorkerError`'s attributes:
    `verdict` (who waited in which collective, who never arrived), `never_arrived` (those
    ranks) and `stacks` (every rank's Python stack at the moment the hang was detected, by rank).
    """

    def __init__(
        self, failures: list[RankFailure], stacks: dict[int, str], verdict: str, never_arrived: list[int]
    ) -> None:
        self.stacks = dict(sorted(stacks.items()))
        self.verdict = verdict
        self.never_arrived = list(never_arrived)
        super().__init__(failures)

    def _describe(self) -> str:
        lines = [f"the job hung: {self.verdict}." if self.verdict else "the job hung.", ""]
        lines.append(f"Cause as first reported: {self.failures[0].summary()}")
        for rank, stack in self.stacks.items():
            lines += ["", f"Stack of rank {rank}:", stack.rstrip() or "(empty)"]
        return "\n".join(lines)

    def __reduce__(self):
        return (
            type(self),
            (self.failures, self.stacks, self.verdict, self.never_arrived),
            {"attempts": self.attempts, "args": self.args},
        )
