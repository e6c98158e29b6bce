"""Files phalanx writes and reads back, safe in folders that other users can reach.

Every file phalanx creates is opened with `O_CREAT|O_EXCL|O_NOFOLLOW`: a name that another
user planted (a symbolic link to one of your files, a file of theirs) makes the creation fail
instead of writing through it. Files phalanx reads back and then trusts (sweep results, SLURM
failure records) must be owned by this user and sit in a folder no one else can write; any
other file is refused, unread, with an `UntrustedFileError` naming it.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from phalanx.errors import UntrustedFileError

__all__ = [
    "PRIVATE_MODE",
    "check_trusted_folder",
    "create_exclusive",
    "open_owned",
    "read_trusted",
    "temporary_beside",
    "write_atomically",
]

PRIVATE_MODE = 0o600
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


def create_exclusive(path: str | os.PathLike, mode: int = PRIVATE_MODE) -> int:
    """Create `path` for writing, failing if anything (a file, a symbolic link) is already there.

    Returns the descriptor. `mode` is filtered by the umask as usual: 0600 stays private,
    0666 gives the user's default permissions (checkpoints, which are the user's data).
    """
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)


def temporary_beside(path: Path) -> Path:
    """A fresh, unguessable name beside `path` for what will be renamed over it: no one can plant a link there first."""
    return path.parent / f".{path.name}.tmp-{secrets.token_hex(8)}"


def write_atomically(path: str | os.PathLike, data: bytes, mode: int = PRIVATE_MODE) -> None:
    """Write `data` to `path` through a fresh temporary file of unguessable name, renamed over it.

    A crash leaves the old file or the new one; the temporary is created exclusively, so no
    planted link can redirect the write.
    """
    path = Path(path)
    temporary = temporary_beside(path)
    fd = create_exclusive(temporary, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def check_trusted_folder(folder: str | os.PathLike) -> None:
    """Refuse a folder where another user could create or replace files."""
    folder = Path(folder)
    try:
        info = os.stat(folder)
    except OSError as error:
        raise UntrustedFileError(f"cannot check folder {str(folder)!r}: {error}") from error
    uid = _uid()
    if uid is not None and info.st_uid not in (uid, 0):
        raise UntrustedFileError(
            f"folder {str(folder)!r} belongs to uid {info.st_uid}, not to you (uid {uid}): its owner could "
            "replace the files phalanx reads back from it. Use a folder of your own."
        )
    writable_by_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not info.st_mode & stat.S_ISVTX:
        raise UntrustedFileError(
            f"folder {str(folder)!r} has mode {stat.S_IMODE(info.st_mode):04o}: other users can write into it, "
            f"so a file phalanx reads back from it could be theirs. Run `chmod go-w {folder}` or use a "
            "folder of your own."
        )


def open_owned(path: str | os.PathLike) -> int:
    """A read-only descriptor of `path`, a regular file owned by this user; anything else is refused.

    Refused (`UntrustedFileError`, naming the file, nothing read): a symbolic link, a file
    owned by another user, or something that is not a regular file. The check is made on the
    opened descriptor, so the file cannot be swapped between the check and the reading. Use it
    alone in a sticky folder such as /dev/shm, where only a file's owner can replace it.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError as error:
        if os.path.islink(path):
            raise UntrustedFileError(
                f"{str(path)!r} is a symbolic link; phalanx reads back only the plain files it wrote"
            ) from error
        raise
    try:
        info = os.fstat(fd)
        uid = _uid()
        if uid is not None and info.st_uid != uid:
            raise UntrustedFileError(
                f"{str(path)!r} is owned by uid {info.st_uid}, not by you (uid {uid}): phalanx did not write it "
                "for you, so it is not read. Remove it if you do not know where it came from."
            )
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedFileError(f"{str(path)!r} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_trusted(path: str | os.PathLike) -> bytes:
    """The bytes of a file this user wrote, in a folder only this user can write; else refused.

    Refused (`UntrustedFileError`, naming the file): a symbolic link, a file owned by another
    user, or any file in a folder that `check_trusted_folder` refuses.
    """
    path = Path(path)
    check_trusted_folder(path.parent)
    fd = open_owned(path)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
