"""Resource faults: memory, large values, many launches at once, a full disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid

import pytest
import torch

import phalanx as px

pytestmark = pytest.mark.timeout(120)

ONE = px.Platform(device="cpu", n_procs=1)


def _allocate_beyond_the_limit():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # this rank may map 4 GiB at most
    return torch.empty(8 << 30, dtype=torch.uint8)


def test_a_rank_that_runs_out_of_memory_is_reported_and_the_others_stopped():
    start = time.monotonic()
    with pytest.raises(px.WorkerError) as info:
        px.launch(_allocate_beyond_the_limit, platform=px.Platform(device="cpu", n_procs=2))
    assert time.monotonic() - start < 20
    error = info.value
    # torch raises for a failed allocation; a kernel OOM kill would show as SIGKILL instead
    assert error.exc_type in ("RuntimeError", "MemoryError", "OutOfMemoryError") or error.signal_name == "SIGKILL"
    assert "memory" in str(error).lower() or "alloc" in str(error).lower() or error.signal_name


def _one_gibibyte():
    value = torch.empty(1 << 30, dtype=torch.uint8)
    value[:: 1 << 20] = 7  # a mark on every MiB, to check the whole value came back
    return value


def test_a_one_gibibyte_return_value_comes_back_whole():
    start = time.monotonic()
    (value,) = px.launch(_one_gibibyte, platform=ONE)
    assert time.monotonic() - start < 60
    assert value.numel() == 1 << 30
    assert int(value[:: 1 << 20].sum()) == 7 * 1024
    del value


def test_twenty_launches_started_at_once_all_return_their_own_values():
    count = 20
    start_together = threading.Barrier(count)
    results: dict[int, object] = {}

    def one_launch(index: int) -> None:
        start_together.wait()
        try:
            results[index] = px.launch(lambda: index * 10 + px.get_rank(), platform=ONE)
        except BaseException as error:  # kept, so the assertion below shows it
            results[index] = error

    threads = [threading.Thread(target=one_launch, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=100)
    assert results == {index: [index * 10] for index in range(count)}


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the test: a disk too full for a 4 MiB checkpoint."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], check=True, timeout=30)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, timeout=30)


def _save_small_then_large(path: str):
    ctx = px.Context(model=torch.nn.Linear(4, 4), step=1)
    ctx.save(path, wait=True)
    ctx.model = torch.nn.Linear(1024, 1024)  # 4 MiB: does not fit
    ctx.step = 2
    try:
        ctx.save(path)
    except px.CheckpointError as error:
        return str(error)
    return "saved"


def test_a_disk_too_full_for_a_checkpoint_raises_on_every_rank_and_keeps_the_previous_one(small_disk):
    path = small_disk / "ckpt.pt"
    messages = px.launch(_save_small_then_large, str(path), platform=px.Platform(device="cpu", n_procs=2))
    assert all("cannot write checkpoint" in message for message in messages), messages
    assert any(word in messages[0] for word in ("No space left", "file write failed", "unexpected pos"))
    assert sorted(os.listdir(small_disk)) == ["ckpt.pt"]  # no temporary file left
    assert torch.load(path, weights_only=True)["step"] == 1


def test_a_store_that_fails_to_start_stops_the_workers_already_forking(monkeypatch):
    from phalanx.rendezvous import StoreListener
    from phalanx.runners import zygote

    serving = zygote.get_zygote().pid

    def fail_to_start(listener, timeout, secret):
        raise RuntimeError("the store did not start, on purpose")

    monkeypatch.setattr(StoreListener, "host", fail_to_start)  # the zygote is forking the ranks meanwhile
    with pytest.raises(RuntimeError, match="on purpose"):
        px.launch(px.get_rank, platform=px.Platform(device="cpu", n_procs=2))
    monkeypatch.undo()
    assert px.launch(px.get_rank, platform=px.Platform(device="cpu", n_procs=2)) == [0, 1]
    assert zygote.get_zygote().pid == serving  # the zygote took the job's end in its stride
