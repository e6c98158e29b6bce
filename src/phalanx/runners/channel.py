"""Length-prefixed frames over pipes and sockets, and the pickling that names what failed.

Control messages (small dicts of plain values) use the standard pickle; user objects (the
function, its arguments, return values, exceptions) use cloudpickle so that lambdas, closures
and functions defined in `__main__` or a notebook cell travel by value. The call carries the
source lines of such code with it, so that a rank's traceback shows them
(see `phalanx.runners.source_lines`).
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import struct
from collections.abc import Iterator
from typing import Any

import cloudpickle

from phalanx.errors import SerializationError
from phalanx.runners import source_lines
from phalanx.runners.shared_tensors import dumps_sharing_tensors

__all__ = [
    "FrameReader",
    "decode",
    "dumps_call",
    "dumps_value",
    "encode",
    "loads_call",
    "read_frame",
    "recv_exactly",
    "write_frame",
]

_HEADER = struct.Struct("!Q")


def encode(message: dict[str, Any]) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(frame: bytes) -> dict[str, Any]:
    return pickle.loads(frame)


def write_frame(fd: int, data: bytes) -> None:
    """Write one frame to a blocking descriptor, all of it."""
    header = _HEADER.pack(len(data))
    if len(data) < 1 << 16:  # small frames go in one write; large ones are not copied to prepend the header
        _write_all(fd, memoryview(header + data))
    else:
        _write_all(fd, memoryview(header))
        _write_all(fd, memoryview(data))


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """`size` bytes from a blocking socket; EOFError if it closes first."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        received = sock.recv_into(view)
        if not received:
            raise EOFError("the other end closed the socket mid-message")
        view = view[received:]
    return bytes(buffer)


def read_frame(sock: socket.socket) -> bytes:
    """One frame from a blocking socket, and not a byte of the next: those stay in the socket."""
    (size,) = _HEADER.unpack(recv_exactly(sock, _HEADER.size))
    return recv_exactly(sock, size)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FrameReader:
    """Collects bytes as they arrive and hands out whole frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._head = bytearray()  # `read_from`: the header being read
        self._body: bytearray | None = None  # `read_from`: the frame being filled, at its full size
        self._filled = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + size
            if len(self._buffer) < end:
                return
            frame = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            yield frame

    def read_from(self, fd: int) -> tuple[list[bytearray], bool]:
        """Read what the non-blocking `fd` holds now: (the whole frames, whether it reached its end).

        A frame's body is read straight into a buffer of its announced size, so a large value
        is not copied again on its way in.
        """
        frames = []
        while True:
            try:
                if self._body is None:
                    chunk = os.read(fd, _HEADER.size - len(self._head))
                    if not chunk:
                        return frames, True
                    self._head += chunk
                    if len(self._head) == _HEADER.size:
                        (size,) = _HEADER.unpack(self._head)
                        self._head.clear()
                        self._body, self._filled = bytearray(size), 0
                else:
                    with memoryview(self._body) as view:
                        count = os.readv(fd, [view[self._filled :]])
                    if not count:
                        return frames, True
                    self._filled += count
            except BlockingIOError:
                return frames, False
            if self._body is not None and self._filled == len(self._body):
                frames.append(self._body)
                self._body = None


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} of type {type(value).__module__}.{type(value).__qualname__}"


def dumps_call(fn: Any, args: tuple, kwargs: dict[str, Any]) -> bytes:
    """Pickle `fn(*args, **kwargs)` for the workers; an unpicklable piece is named in the error.

    The payload is the call's length, the call, then the source lines a rank cannot read
    itself (a notebook cell's, the `__main__` script's), if any: the lines are known only
    once the call is pickled, and the rank needs them before it unpickles the call.
    """
    buffer = io.BytesIO()
    buffer.write(_HEADER.pack(0))
    try:
        pickler = source_lines.CallPickler(buffer)
        pickler.dump((fn, args, kwargs))
    except Exception as error:
        pieces = [("the function", fn)]
        pieces += [(f"positional argument {index}", value) for index, value in enumerate(args)]
        pieces += [(f"keyword argument {name!r}", value) for name, value in kwargs.items()]
        for label, value in pieces:
            try:
                cloudpickle.dumps(value)
            except Exception as piece_error:
                raise SerializationError(
                    f"{label} ({_describe(value)}) cannot be sent to the ranks: "
                    f"{type(piece_error).__name__}: {piece_error}. Pass something picklable instead "
                    "(for example a path or the arguments to build it inside the function)."
                ) from piece_error
        raise SerializationError(f"the call cannot be pickled: {type(error).__name__}: {error}") from error
    call_size = buffer.tell() - _HEADER.size
    sources = source_lines.sources_for(pickler.file_names)
    if sources:
        pickle.dump(sources, buffer, protocol=pickle.HIGHEST_PROTOCOL)
    buffer.seek(0)
    buffer.write(_HEADER.pack(call_size))
    return buffer.getvalue()


def loads_call(payload: bytes | bytearray) -> tuple[Any, tuple, dict[str, Any]]:
    """The `(fn, args, kwargs)` that `dumps_call` pickled (in a rank: it imports what they need).

    The source lines that came with it go into this process's `linecache` first, so that a
    traceback of the call, even one raised while it is unpickled, shows them.
    """
    # Trusted bytes: the caller's own, through the zygote's private socket pair and pipes, or a
    # SLURM task in the job's 0700 folder (check_trusted_folder runs before submitit reads it).
    view = memoryview(payload)  # slices of it are not copies: a call can carry large arguments
    (call_size,) = _HEADER.unpack_from(view)
    call_end = _HEADER.size + call_size
    if len(view) > call_end:
        source_lines.install(pickle.loads(view[call_end:]))
    return cloudpickle.loads(view[_HEADER.size : call_end])


def dumps_value(value: Any, what: str, shared_prefix: str | None = None) -> bytes:
    """Pickle a value for the caller; `what` names it in the error ("the return value of rank 1").

    With `shared_prefix`, large CPU tensors go through shared memory files of that prefix
    (see `phalanx.runners.shared_tensors`); the caller must be on the same machine.
    """
    try:
        if shared_prefix is not None:
            return dumps_sharing_tensors(value, shared_prefix)
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        raise SerializationError(
            f"{what} ({_describe(value)}) cannot be sent back to the caller: "
            f"{type(error).__name__}: {error}. Return something picklable (tensors, numbers, "
            "dicts, lists, dataclasses)."
        ) from error
