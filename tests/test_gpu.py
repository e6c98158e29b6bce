"""CUDA: runs only where a GPU is visible (marked `gpu`); see docs/gpu.md."""

from __future__ import annotations

import pytest
import torch

import phalanx as px

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
]


def test_gpu_device_puts_each_rank_on_its_own_cuda_device():
    def where():
        return str(px.device()), torch.cuda.current_device()

    assert px.launch(where, platform=px.Platform(device="gpu", n_procs=1)) == [("cuda:0", 0)]


def test_auto_device_chooses_cuda():
    assert px.Platform().resolve().device == "cuda"


def test_nccl_all_reduce_on_gpu_comes_back():
    def reduce():
        import torch.distributed as dist

        value = px.all_reduce(torch.ones(4, device=px.device()), op="sum")
        return dist.get_backend(), value.device.type, value.tolist()

    n = torch.cuda.device_count()
    assert px.launch(reduce, platform=px.Platform(device="gpu")) == [("nccl", "cuda", [float(n)] * 4)] * n


def test_two_ranks_share_one_gpu_with_gloo():
    def reduce():
        return px.all_reduce(torch.ones(2, device=px.device()), op="sum").tolist()

    platform = px.Platform(device="gpu", n_procs=2, backend="gloo")
    assert px.launch(reduce, platform=platform) == [[2.0, 2.0]] * 2


def test_raising_rank_on_gpu_is_reported_with_traceback():
    def fail():
        torch.ones(1, device=px.device())
        raise RuntimeError("gpu rank failed")

    with pytest.raises(px.WorkerError, match="gpu rank failed") as info:
        px.launch(fail, platform=px.Platform(device="gpu", n_procs=1))
    assert "in fail" in info.value.traceback


def test_launch_from_a_caller_that_initialised_cuda():
    torch.ones(1, device="cuda")  # the caller now holds CUDA state: workers must not be forked from it
    assert px.launch(
        lambda: torch.ones(1, device=px.device()).item(), platform=px.Platform(device="gpu", n_procs=1)
    ) == [1.0]
