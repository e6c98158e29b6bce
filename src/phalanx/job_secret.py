"""The job secret: 32 random bytes every rank of one job holds, and nobody else.

Everything a job puts on its store is signed with it (see `phalanx.rendezvous.SignedStore`),
so a stranger who can reach the store can neither plant a value nor forge one. A local launch
makes a fresh secret and hands it to its ranks through the zygote's socket pair; processes on
several machines must be given the same one, in `PHALANX_JOB_SECRET` (hex) or in a file named
by `PHALANX_JOB_SECRET_FILE` (mode 0600, owned by the user). `phalanx secret` prints a new one.
"""

from __future__ import annotations

import os
import secrets
import stat

from phalanx.errors import LaunchError
from phalanx.variables import JOB_SECRET as SECRET_VARIABLE
from phalanx.variables import JOB_SECRET_FILE as SECRET_FILE_VARIABLE

__all__ = ["SECRET_BYTES", "SECRET_FILE_VARIABLE", "SECRET_VARIABLE", "new_secret", "secret_from_environment"]

SECRET_BYTES = 32

HOW_TO_SET = (
    f"Make one with `phalanx secret` and give every process of the job the same value: "
    f"export {SECRET_VARIABLE}=$(phalanx secret) before starting them, or write it to a file only you can "
    f"read (chmod 600) and set {SECRET_FILE_VARIABLE} to its path."
)


def new_secret() -> bytes:
    """32 bytes from the operating system's random source."""
    return secrets.token_bytes(SECRET_BYTES)


def _parse(text: str, where: str) -> bytes:
    text = text.strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise LaunchError(f"{where} is not a hexadecimal string. {HOW_TO_SET}") from None
    if len(secret) < SECRET_BYTES:
        raise LaunchError(
            f"{where} holds {len(secret)} bytes; a job secret needs at least {SECRET_BYTES} "
            f"({2 * SECRET_BYTES} hex digits). {HOW_TO_SET}"
        )
    return secret


def _read_secret_file(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as error:
        raise LaunchError(f"{SECRET_FILE_VARIABLE}={path!r} cannot be opened: {error}. {HOW_TO_SET}") from error
    try:
        info = os.fstat(fd)
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise LaunchError(
                f"{SECRET_FILE_VARIABLE}={path!r} is owned by uid {info.st_uid}, not by you (uid {os.getuid()}): "
                "someone else could have chosen the secret. Write your own file and chmod 600 it."
            )
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise LaunchError(
                f"{SECRET_FILE_VARIABLE}={path!r} has mode {stat.S_IMODE(info.st_mode):04o}: others can read it. "
                f"Run `chmod 600 {path}`."
            )
        data = os.read(fd, 4096).decode("ascii", errors="replace")
    finally:
        os.close(fd)
    return _parse(data, f"the file {path!r} named by {SECRET_FILE_VARIABLE}")


def secret_from_environment() -> bytes | None:
    """The secret this process was given (variable first, then file), or None if neither is set.

    A value that is set but unusable (not hex, too short, a file others can read) is a
    `LaunchError` that says how to fix it: a job must never run unsigned by mistake.
    """
    text = os.environ.get(SECRET_VARIABLE)
    if text:
        return _parse(text, SECRET_VARIABLE)
    path = os.environ.get(SECRET_FILE_VARIABLE)
    if path:
        return _read_secret_file(path)
    return None
