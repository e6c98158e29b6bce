"""Training helpers: to_device, prepare_model and the sharded, resumable dataloader."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

import phalanx as px
from tests.conftest import CPU

pytestmark = pytest.mark.timeout(90)

Pair = namedtuple("Pair", "left right")


@dataclasses.dataclass
class Batch:
    inputs: torch.Tensor
    meta: str


def test_to_device_moves_tensors_inside_nested_containers():
    nested = {
        "list": [torch.ones(1), (torch.zeros(2), "text")],
        "pair": Pair(torch.ones(1), 3),
        "batch": Batch(torch.ones(2), "keep"),
        "ordered": OrderedDict(a=torch.ones(1)),
    }
    moved = px.to_device(nested, "meta")  # the meta device shows a move without a GPU
    assert moved["list"][0].device.type == "meta" and moved["list"][1][0].device.type == "meta"
    assert moved["list"][1][1] == "text"
    assert isinstance(moved["pair"], Pair) and moved["pair"].left.device.type == "meta" and moved["pair"].right == 3
    assert isinstance(moved["batch"], Batch) and moved["batch"].inputs.device.type == "meta"
    assert moved["batch"].meta == "keep" and nested["batch"].inputs.device.type == "cpu"
    assert isinstance(moved["ordered"], OrderedDict)


def test_to_device_defaults_to_the_rank_device():
    assert px.launch(lambda: str(px.to_device([torch.ones(1)])[0].device), platform=CPU) == ["cpu", "cpu"]


def test_prepare_model_wraps_in_ddp_only_when_distributed():
    def kind():
        model = px.prepare_model(torch.nn.Linear(2, 2))
        again = px.prepare_model(model)
        return type(model).__name__, again is model, str(next(model.parameters()).device)

    assert px.launch(kind, platform=CPU) == [("DistributedDataParallel", True, "cpu")] * 2
    assert px.launch(kind, platform=px.Platform(device="cpu", n_procs=1)) == [("Linear", True, "cpu")]


def test_prepare_model_leaves_a_model_without_trainable_parameters_unwrapped():
    def frozen():
        model = torch.nn.Linear(2, 2).requires_grad_(False)
        return isinstance(px.prepare_model(model), DistributedDataParallel)

    assert px.launch(frozen, platform=CPU) == [False, False]


def test_prepare_model_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        px.prepare_model(lambda x: x)


def _epochs_seen(size, epochs, shuffle=True, batch_size=2):
    def read():
        dataset = TensorDataset(torch.arange(size))
        loader = px.dataloader(dataset, batch_size=batch_size, shuffle=shuffle, seed=3)
        seen = []
        for _ in range(epochs):
            seen.append([int(i) for (batch,) in loader for i in batch])
        return seen, len(loader)

    return px.launch(read, platform=CPU)


def test_shards_are_disjoint_cover_the_dataset_and_change_order_every_epoch():
    (rank0, length0), (rank1, length1) = _epochs_seen(size=12, epochs=3)
    assert length0 == length1 == 3
    for epoch in range(3):
        assert not set(rank0[epoch]) & set(rank1[epoch])
        assert sorted(rank0[epoch] + rank1[epoch]) == list(range(12))
    assert rank0[0] != rank0[1] or rank1[0] != rank1[1]


def test_uneven_dataset_gives_every_rank_the_same_number_of_batches():
    (rank0, length0), (rank1, length1) = _epochs_seen(size=11, epochs=1)
    assert len(rank0[0]) == len(rank1[0]) == 6 and length0 == length1
    assert set(rank0[0]) | set(rank1[0]) == set(range(11))


def test_batches_arrive_on_the_rank_device():
    def devices():
        loader = px.dataloader(TensorDataset(torch.arange(4.0)), batch_size=2)
        return {str(batch.device) for (batch,) in loader}

    assert px.launch(devices, platform=CPU) == [{"cpu"}, {"cpu"}]


def test_different_seeds_on_different_ranks_are_caught_and_named():
    def rank_dependent_seed():
        loader = px.dataloader(TensorDataset(torch.arange(8)), batch_size=2, shuffle=True, seed=px.get_rank())
        return [batch for batch in loader]

    with pytest.raises(px.WorkerError) as info:
        px.launch(rank_dependent_seed, platform=CPU)
    assert "rank 0: seed=0, rank 1: seed=1" in str(info.value)


def test_loader_resumes_mid_epoch_from_its_state():
    def resume():
        dataset = TensorDataset(torch.arange(20))
        first = px.dataloader(dataset, batch_size=2, shuffle=True, seed=1)
        whole = [[int(i) for (b,) in first for i in b] for _ in range(2)]
        stopped = px.dataloader(dataset, batch_size=2, shuffle=True, seed=1)
        iterator = iter(stopped)
        head = [int(i) for _ in range(2) for i in next(iterator)[0]]
        state = stopped.state_dict()
        resumed = px.dataloader(dataset, batch_size=2, shuffle=True, seed=1)
        resumed.load_state_dict(state)
        tail = [int(i) for (b,) in resumed for i in b]
        next_epoch = [int(i) for (b,) in resumed for i in b]
        return state, whole, head + tail, next_epoch

    for state, whole, stitched, next_epoch in px.launch(resume, platform=CPU):
        assert state == {"epoch": 0, "batches": 2}
        assert stitched == whole[0] and next_epoch == whole[1]


def test_an_abandoned_pass_makes_the_next_pass_a_new_epoch():
    loader = px.dataloader(TensorDataset(torch.arange(6)), batch_size=2, shuffle=True)
    next(iter(loader))
    list(loader)
    assert loader.state_dict() == {"epoch": 2, "batches": 0}
