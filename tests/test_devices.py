"""phalanx.devices: which devices exist here, and which one each rank computes on."""

from __future__ import annotations

import os

import pytest
import torch

import phalanx as px
from phalanx import devices, dist, platform
from phalanx.compat import ddpw

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def two_gpus(monkeypatch):
    """Make torch report two CUDA devices, and record the set_device calls (no GPU is touched)."""
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize("device_type", ["cpu", "mps"])
def test_cpu_and_mps_ranks_share_the_one_device_without_an_index(device_type):
    assert [devices.rank_device(device_type, rank) for rank in range(3)] == [torch.device(device_type)] * 3


def test_ranks_take_the_visible_gpus_in_turn(two_gpus):
    assert [devices.rank_device("cuda", rank).index for rank in range(5)] == [0, 1, 0, 1, 0]


def test_a_device_type_that_counts_none_gives_index_zero(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert devices.rank_device("cuda", 3) == torch.device("cuda", 0)


def test_select_rank_device_makes_the_ranks_gpu_current(two_gpus):
    assert devices.select_rank_device("cuda", 3) == torch.device("cuda", 1)
    assert two_gpus == [1]


def test_select_rank_device_on_cpu_sets_nothing(two_gpus):
    assert devices.select_rank_device("cpu", 3) == torch.device("cpu")
    assert two_gpus == []


def test_dist_device_outside_a_launch_is_the_rank_device_of_the_local_rank(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert devices.default_device_type() == "cuda"
    assert px.device() == torch.device("cuda", 1)
    assert dist.device() == devices.rank_device("cuda", 3)


def test_ddpw_to_moves_to_the_device_phalanx_gives_the_rank(two_gpus, monkeypatch):
    """DDPW's `to(module, local_rank)` and `px.device()` agree, even with more ranks than GPUs."""
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert ddpw._target_device(ddpw.Device.GPU, 3) == px.device() == torch.device("cuda", 1)
    assert ddpw._target_device(ddpw.Device.CPU, 3) == torch.device("cpu")


def test_ddpw_sees_the_gpus_that_devices_sees(two_gpus):
    assert "gpu" in ddpw._available_kinds()
    assert ddpw.Platform(device="gpu", n_gpus=2).n_gpus == 2  # two visible: accepted
    with pytest.raises(px.PlatformError, match="only 2 GPU"):
        ddpw.Platform(device="gpu", n_gpus=3)


def test_available_device_types_end_with_cpu_and_the_default_is_the_first():
    found = devices.available_device_types()
    assert found[-1] == "cpu"
    assert devices.default_device_type() == found[0]
    assert devices.is_available("cpu") and devices.device_count("cpu") == 1


def test_platform_keeps_exporting_the_device_functions_of_devices():
    assert platform.available_device_types is devices.available_device_types
    assert platform.default_device_type is devices.default_device_type


def test_device_type_exists_knows_torch_types_only():
    assert devices.device_type_exists("cuda") and devices.device_type_exists("meta")
    assert not devices.device_type_exists("tpu-unknown")


def test_backend_available_answers_for_this_torch_build():
    assert devices.backend_available("gloo") == torch.distributed.is_gloo_available()
    assert not devices.backend_available("carrier-pigeon")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no affinity mask on this system")
def test_usable_cores_is_the_affinity_mask():
    assert devices.usable_cores() == len(os.sched_getaffinity(0))
