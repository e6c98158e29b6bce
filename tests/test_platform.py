"""Platform: validated at construction, resolved to concrete values for this machine."""

from __future__ import annotations

import dataclasses
import pickle
import sys
import types
from datetime import timedelta

import pytest
import torch

import phalanx as px
from phalanx.runners.slurm import submit_slurm


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


# -- SLURM options: one SlurmOptions record, also given by DDPW's names --------------------------

SLURM_VALUES = {
    "partition": "gpu",
    "time": "2:00:00",
    "ram": "16G",
    "account": "lab",
    "qos": "high",
    "slurm_additional_parameters": {"overcommit": True},
    "requeue": True,
}


def test_slurm_options_by_their_own_names_fill_the_slurm_record():
    platform = px.Platform(device="cpu", **SLURM_VALUES)
    assert platform.slurm == px.SlurmOptions(**SLURM_VALUES)
    assert {name: getattr(platform, name) for name in SLURM_VALUES} == SLURM_VALUES


def test_slurm_options_as_a_record_read_back_by_their_names():
    platform = px.Platform(device="cpu", slurm=px.SlurmOptions(partition="gpu", time=30))
    assert (platform.partition, platform.time, platform.requeue) == ("gpu", 30, False)
    assert platform == px.Platform(device="cpu", partition="gpu", time=30)


def test_a_platform_without_slurm_options_has_the_default_record():
    platform = px.Platform(device="cpu")
    assert isinstance(platform.slurm, px.SlurmOptions) and platform.slurm == px.SlurmOptions()
    assert platform.partition is None and platform.requeue is False


def test_a_slurm_option_given_twice_with_different_values_is_refused():
    with pytest.raises(px.PlatformError, match=r"Platform\(partition='a'\).*gives partition='b'") as info:
        px.Platform(device="cpu", partition="a", slurm=px.SlurmOptions(partition="b"))
    assert info.value.field == "partition"
    with pytest.raises(px.PlatformError, match="requeue"):
        px.Platform(device="cpu", requeue=False, slurm=px.SlurmOptions(requeue=True))


def test_slurm_options_from_both_places_are_merged_when_they_agree():
    platform = px.Platform(device="cpu", partition="a", qos="q", slurm=px.SlurmOptions(partition="a", account="b"))
    assert platform.slurm == px.SlurmOptions(partition="a", account="b", qos="q")


@pytest.mark.parametrize(
    ("name", "value", "hint"),
    [
        ("time", 0, "at least 1"),
        ("time", "soon", "'HH:MM:SS'"),
        ("time", "0:00", "at least 1"),
        ("time", True, "minutes"),
        ("ram", -1, "gigabytes"),
        ("partition", 3, "a string"),
        ("account", "", "a string"),
        ("slurm_additional_parameters", "--exclusive", "dict of sbatch options"),
        ("requeue", "yes", "True or False"),
    ],
)
def test_bad_slurm_option_is_refused_naming_the_field_by_either_name(name, value, hint):
    with pytest.raises(px.PlatformError, match=rf"^Platform\({name}=.*{hint}") as info:
        px.Platform(device="cpu", **{name: value})
    assert info.value.field == name
    with pytest.raises(px.PlatformError, match=rf"^SlurmOptions\({name}=.*{hint}") as info:
        px.SlurmOptions(**{name: value})
    assert info.value.field == name


def test_slurm_must_be_a_slurm_options_record():
    with pytest.raises(px.PlatformError, match=r"Platform\(slurm=.*SlurmOptions") as info:
        px.Platform(device="cpu", slurm={"partition": "gpu"})
    assert info.value.field == "slurm"


def test_slurm_options_are_frozen():
    with pytest.raises(AttributeError):
        px.SlurmOptions().partition = "gpu"


@pytest.mark.parametrize(
    ("time", "minutes"),
    [
        (None, 60),
        (90, 90),
        ("30", 30),
        ("1:30", 2),  # MM:SS, rounded up
        ("2:00:00", 120),
        ("1-0", 1440),  # D-HH
        ("1-2:30", 1590),  # D-HH:MM
        ("1-2:30:01", 1591),
        ("0:00:30", 1),
    ],
)
def test_slurm_time_in_each_of_slurms_formats_is_read_as_minutes(time, minutes):
    assert px.SlurmOptions(time=time).minutes == minutes


def test_replace_keeps_the_slurm_options_of_a_platform_built_with_their_names():
    built = px.Platform(device="cpu", partition="gpu", time=30, slurm_additional_parameters={"a": 1})
    changed = dataclasses.replace(built, n_procs=4)
    assert changed.n_procs == 4
    assert changed.slurm == built.slurm and (changed.partition, changed.time) == ("gpu", 30)
    assert built.resolve().slurm == built.slurm


def test_replace_with_new_slurm_options_takes_them_whole():
    built = px.Platform(device="cpu", partition="gpu", time=30)
    changed = dataclasses.replace(built, slurm=px.SlurmOptions(partition="long"))
    assert (changed.partition, changed.time) == ("long", None)


def test_replace_by_a_slurm_option_name_fills_an_unset_one_and_refuses_to_overwrite_a_set_one():
    built = px.Platform(device="cpu", partition="gpu")
    assert dataclasses.replace(built, account="lab").slurm == px.SlurmOptions(partition="gpu", account="lab")
    with pytest.raises(px.PlatformError, match=r"dataclasses\.replace\(p, slurm=dataclasses\.replace\(p\.slurm"):
        dataclasses.replace(built, partition="long")


def test_a_platform_with_slurm_options_pickles_and_hashes():
    platform = px.Platform(device="cpu", **SLURM_VALUES)  # a dict among them: not hashed
    assert pickle.loads(pickle.dumps(platform)) == platform
    assert hash(platform) == hash(px.Platform(device="cpu", **SLURM_VALUES))


def test_submit_slurm_passes_the_slurm_options_to_submitit(tmp_path, monkeypatch):
    seen: dict = {}

    class Executor:
        def __init__(self, folder, cluster):
            seen["cluster"] = cluster

        def update_parameters(self, **parameters):
            seen.update(parameters)

        def submit(self, task):
            seen["task"] = type(task).__name__
            return types.SimpleNamespace(job_id="7")

    monkeypatch.setitem(sys.modules, "submitit", types.SimpleNamespace(AutoExecutor=Executor))
    slurm = px.SlurmOptions(**{**SLURM_VALUES, "time": "1-2:30"})
    platform = px.Platform(cluster="slurm", n_procs=2, slurm=slurm, log_dir=str(tmp_path))
    job = submit_slurm(print, (), {}, platform, gather=True)
    assert job.job_id == "7"
    assert seen["timeout_min"] == 1590 and seen["slurm_mem"] == "16G" and seen["task"] == "_RequeuableTask"
    assert (seen["slurm_partition"], seen["slurm_account"], seen["slurm_qos"]) == ("gpu", "lab", "high")
    assert seen["slurm_additional_parameters"] == {"overcommit": True}
