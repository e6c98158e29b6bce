"""Return values: large CPU tensors come back through shared memory, whole, and leave no file."""

from __future__ import annotations

import os
import time

import pytest
import torch

import phalanx as px
from phalanx.runners.shared_tensors import SHARED_MEMORY_FOLDER

CPU = px.Platform(device="cpu", n_procs=2)


def _shared_files() -> set[str]:
    return {name for name in os.listdir(SHARED_MEMORY_FOLDER) if name.startswith(f"phalanx-{os.getpid()}-")}


def _mapped_from_shared_memory(tensor: torch.Tensor) -> bool:
    """True when the tensor's memory is a mapping of one of phalanx's shared memory files."""
    address = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, *_, path = line.split(maxsplit=5)
            low, high = (int(end, 16) for end in span.split("-"))
            if low <= address < high:
                return os.path.basename(path.split()[0]).startswith(f"phalanx-{os.getpid()}-")
    return False


def _large_values():
    rank = px.get_rank()
    base = torch.arange(1 << 20, dtype=torch.float64) + rank  # 8 MiB
    return {
        "base": base,
        "view": base[10:20],
        "strided": base.view(1024, 1024).t(),
        "parameter": torch.nn.Parameter(torch.full((512, 1024), float(rank))),
        "bfloat16": torch.ones(1 << 20, dtype=torch.bfloat16),
        "small": torch.tensor([rank]),
    }


def test_large_tensors_come_back_equal_with_views_sharing_their_storage_and_no_file_left():
    for rank, value in enumerate(px.launch(_large_values, platform=CPU)):
        expected = torch.arange(1 << 20, dtype=torch.float64) + rank
        assert torch.equal(value["base"], expected)
        assert value["view"].data_ptr() == value["base"][10:20].data_ptr()
        assert torch.equal(value["strided"], expected.view(1024, 1024).t())
        assert isinstance(value["parameter"], torch.nn.Parameter) and value["parameter"].requires_grad
        assert value["bfloat16"].dtype == torch.bfloat16 and value["small"].item() == rank
        value["base"] += 1  # the caller owns a writable copy-on-write mapping
        assert value["view"][0].item() == 11 + rank
        assert _mapped_from_shared_memory(value["base"]) and _mapped_from_shared_memory(value["parameter"])
    assert _shared_files() == set()


def _return_large_then_fail_on_rank_1(caller_pid: int):
    if px.get_rank() == 0:
        return torch.zeros(1 << 21)
    deadline = time.monotonic() + 30
    while not any(name.startswith(f"phalanx-{caller_pid}-") for name in os.listdir(SHARED_MEMORY_FOLDER)):
        if time.monotonic() > deadline:
            raise TimeoutError("rank 0 never wrote its shared memory file")
        time.sleep(0.01)  # waits for a condition: rank 0's file, not for a guessed time
    raise ValueError("rank 1 fails after rank 0 returned")


@pytest.mark.timeout(60)
def test_a_failed_launch_leaves_no_shared_memory_file():
    with pytest.raises(px.WorkerError, match="rank 1 fails"):
        px.launch(_return_large_then_fail_on_rank_1, os.getpid(), platform=CPU)
    assert _shared_files() == set()


def test_with_sharing_turned_off_large_tensors_still_come_back(monkeypatch):
    monkeypatch.setenv("PHALANX_SHARED_MEMORY", "0")
    values = px.launch(_large_values, platform=CPU)
    assert torch.equal(values[1]["base"], torch.arange(1 << 20, dtype=torch.float64) + 1)
    assert _shared_files() == set()
