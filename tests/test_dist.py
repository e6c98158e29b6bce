"""Rank helpers and collectives: the same calls inside a 2-rank job and in plain code."""

from __future__ import annotations

import pytest
import torch

import phalanx as px
from tests.conftest import CPU

pytestmark = pytest.mark.timeout(60)


def test_helpers_outside_a_launch_behave_as_world_size_one():
    assert (px.get_rank(), px.get_local_rank(), px.get_world_size(), px.get_node_rank()) == (0, 0, 1, 0)
    assert px.is_master() and not px.is_distributed()
    px.barrier()
    assert px.broadcast_from_master({"a": 1}) == {"a": 1}
    assert px.all_gather(5) == [5]
    assert px.all_reduce(3, op="sum") == 3
    assert px.all_reduce(torch.tensor([2.0, 4.0])).tolist() == [2.0, 4.0]
    assert isinstance(px.device(), torch.device)


def test_rank_facts_inside_a_launch():
    def facts():
        return (
            px.get_rank(),
            px.get_local_rank(),
            px.get_world_size(),
            px.get_local_world_size(),
            px.get_node_rank(),
            px.is_master(),
            px.is_distributed(),
            str(px.device()),
        )

    assert px.launch(facts, platform=CPU) == [(0, 0, 2, 2, 0, True, True, "cpu"), (1, 1, 2, 2, 0, False, True, "cpu")]


def test_broadcast_from_master_gives_rank_zero_object_everywhere():
    assert px.launch(lambda: px.broadcast_from_master({"from": px.get_rank()}), platform=CPU) == [{"from": 0}] * 2


def test_all_gather_objects_by_rank():
    assert px.launch(lambda: px.all_gather(f"r{px.get_rank()}"), platform=CPU) == [["r0", "r1"]] * 2


def test_all_gather_tensors_of_different_shapes():
    def gather():
        mine = torch.arange(px.get_rank() + 2, dtype=torch.float32)
        return [t.tolist() for t in px.all_gather(mine)]

    assert px.launch(gather, platform=CPU) == [[[0.0, 1.0], [0.0, 1.0, 2.0]]] * 2


@pytest.mark.parametrize(("op", "expected"), [("sum", 3.0), ("mean", 1.5), ("max", 2.0), ("min", 1.0)])
def test_all_reduce_tensor_ops(op, expected):
    def reduce():
        mine = torch.tensor([px.get_rank() + 1.0])
        result = px.all_reduce(mine, op=op)
        return result.item(), mine.item()

    assert px.launch(reduce, platform=CPU) == [(expected, 1.0), (expected, 2.0)]  # input left untouched


def test_all_reduce_numbers_come_back_as_numbers():
    assert px.launch(lambda: px.all_reduce(px.get_rank() + 1, op="sum"), platform=CPU) == [3, 3]
    assert px.launch(lambda: px.all_reduce(px.get_rank(), op="mean"), platform=CPU) == [0.5, 0.5]


def test_all_reduce_rejects_unknown_op():
    with pytest.raises(ValueError, match=r"all_reduce.*median"):
        px.all_reduce(1.0, op="median")


def test_barrier_waits_for_every_rank(tmp_path):
    def write_then_read():
        (tmp_path / f"{px.get_rank()}").write_text("here")
        px.barrier()
        return sorted(p.name for p in tmp_path.iterdir())

    assert px.launch(write_then_read, platform=px.Platform(device="cpu", n_procs=3)) == [["0", "1", "2"]] * 3
