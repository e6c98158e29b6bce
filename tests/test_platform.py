"""Platform: validated at construction, resolved to concrete values for this machine."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

import phalanx as px


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"device": "tpu-unknown"}, "device", "allowed are"),
        ({"device": "cuda:1"}, "device", "CUDA_VISIBLE_DEVICES"),
        ({"n_procs": 0}, "n_procs", "at least 1"),
        ({"n_procs": -2}, "n_procs", "at least 1"),
        ({"n_procs": 2.5}, "n_procs", "whole number"),
        ({"n_cpus": 0}, "n_cpus", "at least 1"),
        ({"n_nodes": 0}, "n_nodes", "at least 1"),
        ({"n_nodes": 2, "node_rank": 2}, "node_rank", "between 0 and"),
        ({"master_port": 70000}, "master_port", "between 1 and 65535"),
        ({"master_port": -1}, "master_port", "between 1 and 65535"),
        ({"master_addr": ""}, "master_addr", "host name"),
        ({"backend": "carrier-pigeon"}, "backend", "known backends"),
        ({"device": "cpu", "backend": "nccl"}, "backend", "does not serve device 'cpu'"),
        ({"timeout": -5}, "timeout", "positive"),
        ({"cluster": "kubernetes"}, "cluster", "allowed are"),
        ({"max_restarts": -1}, "max_restarts", ">= 0"),
        ({"n_procs": 2, "n_gpus": 3}, "n_gpus", "disagrees"),
        ({"console_logs": "yes"}, "console_logs", "True or False"),
    ],
)
def test_bad_value_raises_platform_error_naming_field_and_value(kwargs, field, hint):
    with pytest.raises(px.PlatformError) as info:
        px.Platform(**kwargs)
    message = str(info.value)
    assert f"Platform({field}=" in message
    assert hint in message
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_device_is_refused_with_the_fix():
    with pytest.raises(px.PlatformError, match=r"no cuda device is available here.*device='auto'"):
        px.Platform(device="gpu")


def test_gpu_is_an_alias_of_cuda_and_names_are_case_insensitive():
    assert px.Platform(device="CPU").device == "cpu"
    assert px.Platform(device="gpu", cluster="slurm").device == "cuda"  # SLURM nodes have the GPUs


def test_n_gpus_is_ddpw_name_for_n_procs():
    assert px.Platform(device="cpu", n_gpus=3).n_procs == 3


def test_platform_is_frozen():
    platform = px.Platform()
    with pytest.raises(AttributeError):
        platform.n_procs = 3


def test_resolve_makes_defaults_concrete():
    resolved = px.Platform(device="cpu").resolve()
    assert resolved.device == "cpu"
    assert resolved.n_procs == 1
    assert resolved.backend == "gloo"
    assert resolved.cluster == "local"
    assert resolved.n_cpus >= 1
    assert resolved.master_port is None  # chosen when the store binds port 0


def test_auto_device_prefers_accelerators_then_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert px.Platform().resolve().device == expected


def test_timeout_accepts_seconds_or_timedelta():
    assert px.Platform(timeout=90).timeout_delta == timedelta(seconds=90)
    assert px.Platform(timeout=timedelta(minutes=2)).timeout_delta == timedelta(minutes=2)
    assert px.Platform().timeout_delta == timedelta(minutes=30)


def test_timeout_reaches_the_process_group():
    def group_timeout():
        import torch.distributed as dist

        return dist.distributed_c10d._get_default_timeout(dist.get_backend()) is not None

    assert px.launch(group_timeout, platform=px.Platform(device="cpu", n_procs=1, timeout=42)) == [True]


def test_n_cpus_sets_threads_per_rank():
    assert px.launch(torch.get_num_threads, platform=px.Platform(device="cpu", n_procs=2, n_cpus=1)) == [1, 1]


def test_seed_makes_ranks_draw_the_same_numbers():
    values = px.launch(lambda: torch.rand(3).tolist(), platform=px.Platform(device="cpu", n_procs=2, seed=7))
    assert values[0] == values[1]
    torch.manual_seed(7)
    assert values[0] == torch.rand(3).tolist()
