"""Checkpoint cost: `Context.save` against `torch.save` of the same state, medians, one run.

`Context.save` adds every rank's generator states, writes to a temporary file, flushes it to
disk (fsync) and renames it: the price of a checkpoint that a crash cannot corrupt. The
baseline is a bare `torch.save` of the model and optimizer state dicts to the same folder.

    python bench/checkpoint.py                   # a ~50 MB model, 1 rank
    python bench/checkpoint.py --n-procs 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import phalanx as px


def compare(rounds: int, width: int, folder: str) -> dict[str, float]:
    model = px.prepare_model(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, width, device=px.device())).sum().backward()
    optimizer.step()  # the optimizer now holds two more tensors per parameter
    ctx = px.Context(model=model, optimizer=optimizer, epoch=1)
    ours, bare = Path(folder) / "context.pt", Path(folder) / "bare.pt"
    samples: dict[str, list[float]] = {"Context.save": [], "torch.save": []}
    for round_index in range(rounds + 1):
        order = ["Context.save", "torch.save"] if round_index % 2 == 0 else ["torch.save", "Context.save"]
        for name in order:
            px.barrier()
            start = time.perf_counter()
            if name == "Context.save":
                ctx.save(ours)
            elif px.is_master():
                state = {"model": px.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict()}
                torch.save(state, bare)
            px.barrier()
            if round_index:  # the first round only warms the file system up
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()} | {"bytes": ours.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description="checkpoint benchmark")
    parser.add_argument("--n-procs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--width", type=int, default=1024, help="two width x width layers, plus Adam's state")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-") as folder:
        platform = px.Platform(device="cpu", n_procs=options.n_procs)
        result = px.launch(compare, options.rounds, options.width, folder, platform=platform)[0]
    ours, bare = result["Context.save"], result["torch.save"]
    print(
        f"checkpoint of {result['bytes'] / 2**20:.0f} MiB, {options.n_procs} rank(s): "
        f"Context.save {ours * 1000:.0f} ms, {bare * 1000:.0f} ms; Context.save/torch.save = {ours / bare:.2f}x"
    )


if __name__ == "__main__":
    main()
