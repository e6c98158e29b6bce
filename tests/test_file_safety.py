"""No stranger gets code run, or a value forged, through the files phalanx writes and reads back.

The tests run as root (see tests/conftest.py: the cluster set-up needs it), so a file "of
another user" is one handed to `nobody` with chown.
"""

from __future__ import annotations

import functools
import glob
import os
import pickle
import pwd
import re
import uuid

import pytest
import torch

import phalanx as px
import phalanx.context
from phalanx.files import PRIVATE_MODE, create_exclusive
from phalanx.runners import shared_tensors
from phalanx.sweep import _point_key

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="handing a file to nobody needs root"),
]

ONE_SLOT = px.Platform(device="cpu", n_procs=1)


def _nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this creates the marker file


# -- sweep log_dir ------------------------------------------------------------------------------


def _point(runs: str, x: int) -> int:
    open(os.path.join(runs, f"ran-{x}"), "w").close()
    return x * 10


def _make_untrusted(log_dir, how: str, marker: str):
    """Rewrite point x=1's value as a code-carrying pickle; make one file or folder untrusted; return its path."""
    points = log_dir / "points"
    key = _point_key({"x": 1})
    value_file, record = points / f"{key}.pkl", points / f"{key}.json"
    assert value_file.is_file() and record.is_file()
    value_file.write_bytes(pickle.dumps(_RunsCode(marker)))
    if how == "value file of another user":
        os.chown(value_file, _nobody(), -1)
        return value_file
    if how == "record of another user":
        os.chown(record, _nobody(), -1)
        return record
    if how == "value file replaced by a link":
        planted = log_dir.parent / "planted.pkl"
        planted.write_bytes(value_file.read_bytes())
        value_file.unlink()
        value_file.symlink_to(planted)
        return value_file
    folder = {"group-writable log_dir": log_dir, "group-writable points folder": points}[how]
    os.chmod(folder, 0o770)
    return folder


@pytest.mark.parametrize(
    "how",
    [
        "value file of another user",
        "record of another user",
        "value file replaced by a link",
        "group-writable log_dir",
        "group-writable points folder",
    ],
)
def test_a_sweep_file_someone_else_could_have_written_is_refused_before_any_point_runs(tmp_path, how):
    log_dir, runs, marker = tmp_path / "sweep", tmp_path / "runs", tmp_path / "code-ran"
    runs.mkdir()
    fn = functools.partial(_point, str(runs))
    first = px.sweep(fn, {"x": [1, 2]}, platform=ONE_SLOT, log_dir=log_dir, progress=False)
    assert [r.value for r in first] == [10, 20]
    refused = _make_untrusted(log_dir, how, str(marker))
    for ran in runs.iterdir():
        ran.unlink()
    with pytest.raises(px.UntrustedFileError, match=re.escape(repr(str(refused)))):
        px.sweep(fn, {"x": [1, 2, 3]}, platform=ONE_SLOT, log_dir=log_dir, progress=False)
    assert not marker.exists()  # nothing from the file was unpickled
    assert list(runs.iterdir()) == []  # and no point ran, not even the new one


# -- checkpoints --------------------------------------------------------------------------------


def test_a_link_planted_at_the_checkpoint_temporary_name_is_refused_and_never_written_through(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone's precious file")
    path = tmp_path / "ckpt.pt"
    px.Context(step=1).save(path, wait=True)
    temporary = tmp_path / ".ckpt.pt.tmp-guessed"
    temporary.symlink_to(victim)
    os.lchown(temporary, _nobody(), _nobody())  # another user's link: the stale clean-up leaves it
    monkeypatch.setattr(phalanx.context, "temporary_beside", lambda path: temporary)  # as if the name were guessed
    with pytest.raises(px.CheckpointError, match=re.escape(f"its temporary file {temporary} already exists")):
        px.Context(step=2).save(path)
    assert victim.read_bytes() == b"someone's precious file"
    restored = px.Context(step=0)
    assert restored.load(path) and restored.step == 1  # the previous checkpoint is unchanged
    assert temporary.is_symlink()


# -- shared memory files ------------------------------------------------------------------------


def _shared_name() -> str:
    return f"phalanx-test-{os.getpid()}-{uuid.uuid4().hex}"


def test_a_shared_memory_file_of_another_user_is_refused_and_left_in_place():
    name = _shared_name()
    path = os.path.join(shared_tensors.SHARED_MEMORY_FOLDER, name)
    fd = create_exclusive(path, PRIVATE_MODE)
    try:
        os.write(fd, bytes(1 << 20))
        os.close(fd)
        os.chown(path, _nobody(), -1)
        with pytest.raises(px.UntrustedFileError, match=re.escape(f"{path!r} is owned by uid {_nobody()}")):
            shared_tensors._map_shared_file(name, 1 << 20)
        assert os.path.exists(path)  # not ours to remove
    finally:
        os.unlink(path)


def test_a_rank_never_writes_through_a_link_planted_at_its_shared_memory_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone's precious file")
    prefix = f"{_shared_name()}-"
    planted = os.path.join(shared_tensors.SHARED_MEMORY_FOLDER, f"{prefix}0")  # the first storage's name
    os.symlink(victim, planted)
    try:
        tensor = torch.arange(1 << 18, dtype=torch.float64)  # 2 MiB: large enough to be shared
        payload = shared_tensors.dumps_sharing_tensors({"tensor": tensor}, prefix)
        assert victim.read_bytes() == b"someone's precious file"
        assert torch.equal(pickle.loads(payload)["tensor"], tensor)  # it went through the pickle instead
    finally:
        os.unlink(planted)
        shared_tensors.remove_shared_files(prefix)


class _HandOwnFilesToNobody:
    """Pickled after the tensor: hands the rank's shared memory files to nobody, as a stranger's would be."""

    def __init__(self, caller_pid: int, nobody: int) -> None:
        self.caller_pid, self.nobody = caller_pid, nobody

    def __reduce__(self):
        for path in glob.glob(os.path.join(shared_tensors.SHARED_MEMORY_FOLDER, f"phalanx-{self.caller_pid}-*")):
            os.chown(path, self.nobody, -1)
        return (str, ("handed over",))


def _large_tensor_then_hand_over(caller_pid: int, nobody: int):
    return {"tensor": torch.ones(1 << 20), "after": _HandOwnFilesToNobody(caller_pid, nobody)}


def test_the_caller_refuses_a_returned_shared_memory_file_of_another_user():
    try:
        with pytest.raises(px.WorkerError, match=f"is owned by uid {_nobody()}") as info:
            px.launch(_large_tensor_then_hand_over, os.getpid(), _nobody(), platform=ONE_SLOT)
        assert isinstance(info.value.__cause__, px.UntrustedFileError)
    finally:
        for path in glob.glob(os.path.join(shared_tensors.SHARED_MEMORY_FOLDER, f"phalanx-{os.getpid()}-*")):
            os.unlink(path)  # the caller leaves another user's file alone: remove it here
