"""Large CPU tensors in a rank's return value travel through shared memory, not the pipe.

Pickled through a pipe, a 256 MiB tensor is copied five times (pickle, pipe in, pipe out,
frame buffer, unpickle). Here the rank copies each large storage once into a file in
/dev/shm and pickles only its name; the caller maps the file copy-on-write and unlinks it at
once, so the tensor costs the caller no copy and the memory goes back to the system when the
tensor is freed. Views of one storage share one file. Anything that cannot go this way (no
/dev/shm, a full one, CUDA or sparse tensors) is pickled as usual. Files are named after the
launch (`phalanx-<caller pid>-<launch>-...`), so the caller removes whatever a failed or
killed rank left behind.

/dev/shm is writable by every user (with the sticky bit), and the names can be guessed. So a
rank creates each file with O_EXCL|O_NOFOLLOW (a name someone else took first, a planted link,
makes that tensor go through the pipe instead), and the caller maps only a file owned by this
user: in a sticky folder no one else can replace such a file. Anything else is refused with
`UntrustedFileError` and the value is not unpickled further.
"""

from __future__ import annotations

import contextlib
import glob
import io
import itertools
import mmap
import os
import pickle
from typing import Any

import cloudpickle
import torch

from phalanx import variables
from phalanx.errors import UntrustedFileError
from phalanx.files import PRIVATE_MODE, create_exclusive, open_owned

__all__ = ["SHARED_MEMORY_FOLDER", "dumps_sharing_tensors", "launch_prefix", "remove_shared_files"]

SHARED_MEMORY_FOLDER = "/dev/shm"
_MIN_BYTES = 1 << 20  # smaller tensors are cheaper to pickle than to map
_launches = itertools.count()


def launch_prefix() -> str | None:
    """A file-name prefix unique to one launch from this process, or None where sharing is off.

    `PHALANX_SHARED_MEMORY=0` turns sharing off (the benchmark compares both ways).
    """
    if os.environ.get(variables.SHARED_MEMORY, "1") == "0":
        return None
    if not os.access(SHARED_MEMORY_FOLDER, os.W_OK):
        return None
    return f"phalanx-{os.getpid()}-{next(_launches)}-"


def remove_shared_files(prefix: str | None) -> None:
    """Remove the files of one launch that no caller mapped (a rank failed or was killed)."""
    if prefix is None:
        return
    uid = os.getuid()
    for path in glob.glob(os.path.join(SHARED_MEMORY_FOLDER, glob.escape(prefix) + "*")):
        with contextlib.suppress(OSError):
            if os.lstat(path).st_uid == uid:  # another user's file at our name is theirs to remove
                os.unlink(path)


class _SharedStorage:
    """Stands for one storage's file while pickling: pickle's memo makes views share it."""

    def __init__(self, name: str, nbytes: int) -> None:
        self.name = name
        self.nbytes = nbytes

    def __reduce__(self):
        return _map_shared_file, (self.name, self.nbytes)


def _map_shared_file(name: str, nbytes: int) -> torch.Tensor:
    """In the caller: map the file copy-on-write as bytes, then unlink it (the mapping stays).

    Only a regular file of this user's, at least `nbytes` long, is mapped; anything else raises
    `UntrustedFileError` (which stops the unpickling of the whole value) and is left in place.
    """
    path = os.path.join(SHARED_MEMORY_FOLDER, name)
    if os.path.basename(name) != name:
        raise UntrustedFileError(f"shared memory file name {name!r} is not a plain name in {SHARED_MEMORY_FOLDER}")
    fd = open_owned(path)  # no link followed; ownership is checked on the descriptor that is mapped
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise UntrustedFileError(f"{path!r} holds {size} bytes where the rank wrote {nbytes}: it was changed")
        mapping = mmap.mmap(fd, nbytes, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    os.unlink(path)
    return torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive as long as needed


def _rebuild_tensor(
    storage_bytes: torch.Tensor,
    dtype: torch.dtype,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    offset: int,
    requires_grad: bool,
    is_parameter: bool,
) -> torch.Tensor:
    tensor = storage_bytes.view(dtype).as_strided(size, stride, offset)
    if is_parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad)


def _write_file(path: str, storage: torch.UntypedStorage) -> None:
    """Write one storage to a new file at `path`; OSError if anything is already there."""
    data = memoryview(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
    fd = create_exclusive(path, PRIVATE_MODE)  # O_EXCL|O_NOFOLLOW: never another's file or a link
    try:
        while data:  # a full /dev/shm raises ENOSPC here, never a SIGBUS later
            written = os.write(fd, data)
            data = data[written:]
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)  # this file is the one just created: it is ours to remove
        raise
    finally:
        os.close(fd)


class _SharingPickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO, prefix: str) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._prefix = prefix
        self._storages: dict[int, _SharedStorage] = {}  # by data pointer; also keeps them alive
        self._written: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and self._shareable(obj):
            shared = self._share(obj.untyped_storage())
            if shared is not None:
                arguments = (
                    shared,
                    obj.dtype,
                    tuple(obj.size()),
                    tuple(obj.stride()),
                    obj.storage_offset(),
                    obj.requires_grad,
                    type(obj) is torch.nn.Parameter,
                )
                return _rebuild_tensor, arguments
        return super().reducer_override(obj)

    @staticmethod
    def _shareable(tensor: torch.Tensor) -> bool:
        return (
            tensor.device.type == "cpu"
            and tensor.layout == torch.strided
            and not tensor.is_quantized
            and (tensor.is_leaf or not tensor.requires_grad)
            and tensor.untyped_storage().nbytes() >= _MIN_BYTES
        )

    def _share(self, storage: torch.UntypedStorage) -> _SharedStorage | None:
        key = storage.data_ptr()
        if key not in self._storages:
            name = f"{self._prefix}{len(self._storages)}"
            path = os.path.join(SHARED_MEMORY_FOLDER, name)
            try:
                _write_file(path, storage)
            except OSError:  # full, or the name is taken: this storage is pickled instead
                return None
            self._written.append(path)
            self._storages[key] = _SharedStorage(name, storage.nbytes())
        return self._storages[key]

    def remove_written(self) -> None:
        for path in self._written:
            with contextlib.suppress(OSError):
                os.unlink(path)


def dumps_sharing_tensors(value: Any, prefix: str) -> bytes:
    """cloudpickle `value`, with its large CPU tensors written to shared memory files."""
    buffer = io.BytesIO()
    pickler = _SharingPickler(buffer, prefix)
    try:
        pickler.dump(value)
    except BaseException:
        pickler.remove_written()
        raise
    return buffer.getvalue()
