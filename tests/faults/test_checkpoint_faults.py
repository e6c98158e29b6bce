"""Checkpoint faults seen from a launch: corrupt, truncated and code-carrying files."""

from __future__ import annotations

import os

import pytest
import torch

import phalanx as px

pytestmark = pytest.mark.timeout(60)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # loading this with full unpickling would create the file


def _damage(path: str, how: str, marker: str) -> None:
    if how == "code":
        torch.save({"step": 1, "payload": _RunsCode(marker), "__phalanx__": {}}, path)
        return
    px.Context(model=torch.nn.Linear(8, 8), step=1).save(path, wait=True)
    data = open(path, "rb").read()
    damaged = {"truncated": data[: len(data) // 2], "corrupt": bytes(len(data))}[how]
    with open(path, "wb") as file:
        file.write(damaged)


def _load_in_every_rank(path: str):
    ctx = px.Context(model=torch.nn.Linear(8, 8), step=0)
    before = ctx.model.weight.clone()
    try:
        ctx.load(path)
    except px.CheckpointError as error:
        return str(error), ctx.step, torch.equal(before, ctx.model.weight)
    return "loaded", ctx.step, False


@pytest.mark.parametrize("how", ["truncated", "corrupt", "code"])
def test_a_bad_checkpoint_is_refused_on_every_rank_with_nothing_loaded_or_run(tmp_path, how):
    path, marker = str(tmp_path / "ckpt.pt"), str(tmp_path / "code-ran")
    _damage(path, how, marker)
    results = px.launch(_load_in_every_rank, path, platform=px.Platform(device="cpu", n_procs=2))
    expected = "only running code could rebuild" if how == "code" else "truncated or corrupt"
    for message, step, unchanged in results:
        assert expected in message and path in message
        assert step == 0 and unchanged
    assert not os.path.exists(marker)
