"""Checkpoint cost: `Context.save` against `torch.save` of the same state, medians, one run.

`Context.save` adds every rank's generator states, writes to a temporary file, flushes it to
disk (fsync) and renames it: the price of a checkpoint that neither a crash nor a power loss
can corrupt. The flush and the rename run in the background, so the figure that matters to a
training loop is how long `save` blocks it (the wait for the disk happens between saves, out
of the timed region, as training would overlap it). `Context.save(wait=True)` blocks until
the file is on disk and in place; `durable=False` skips the fsync (still atomic against a
process crash). The baselines are a bare `torch.save` of the model and optimizer state dicts,
and the same followed by an fsync (what a blocking durable save must at least cost).

    python bench/checkpoint.py                   # a ~50 MB model, 1 rank
    python bench/checkpoint.py --n-procs 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import phalanx as px

# Two phases, each interleaving a phalanx save with its baseline: an fsync keeps the disk busy
# for whatever runs right after it, so saves that wait for the disk are not mixed with saves
# that do not.
PHASES = (
    ("Context.save", "Context.save(durable=False)", "torch.save"),
    ("Context.save(wait=True)", "torch.save + fsync"),
)


def _save(name: str, ctx: px.Context, path: Path) -> None:
    if name.startswith("Context.save"):
        ctx.save(path, durable="durable=False" not in name, wait="wait=True" in name)
    elif px.is_master():
        state = {"model": px.unwrap_model(ctx.model).state_dict(), "optimizer": ctx.optimizer.state_dict()}
        with open(path, "wb") as file:
            torch.save(state, file)
            if name.endswith("fsync"):
                file.flush()
                os.fsync(file.fileno())


def compare(rounds: int, width: int, folder: str) -> dict[str, float]:
    model = px.prepare_model(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, width, device=px.device())).sum().backward()
    optimizer.step()  # the optimizer now holds two more tensors per parameter
    ctx = px.Context(model=model, optimizer=optimizer, epoch=1)
    medians: dict[str, float] = {}
    for phase in PHASES:
        samples: dict[str, list[float]] = {name: [] for name in phase}
        for round_index in range(rounds + 1):
            for name in phase if round_index % 2 == 0 else phase[::-1]:
                path = Path(folder) / f"{name}.pt"
                px.barrier()
                start = time.perf_counter()
                _save(name, ctx, path)
                px.barrier()
                if round_index:  # the first round only warms the file system up
                    samples[name].append(time.perf_counter() - start)
                ctx.wait()  # the background flush finishes here, while training would go on
        medians |= {name: statistics.median(times) for name, times in samples.items()}
    size = (Path(folder) / "Context.save.pt").stat().st_size
    return medians | {"bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description="checkpoint benchmark")
    parser.add_argument("--n-procs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--width", type=int, default=1024, help="two width x width layers, plus Adam's state")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-") as folder:
        platform = px.Platform(device="cpu", n_procs=options.n_procs)
        result = px.launch(compare, options.rounds, options.width, folder, platform=platform)[0]
    bare = result["torch.save"]
    figures = ", ".join(f"{name} {result[name] * 1000:.0f} ms" for phase in PHASES for name in phase)
    print(f"checkpoint of {result['bytes'] / 2**20:.0f} MiB, {options.n_procs} rank(s): {figures}")
    print(
        f"Context.save/torch.save = {result['Context.save'] / bare:.2f}x, "
        f"Context.save(durable=False)/torch.save = {result['Context.save(durable=False)'] / bare:.2f}x, "
        f"Context.save(wait=True)/(torch.save + fsync) = "
        f"{result['Context.save(wait=True)'] / result['torch.save + fsync']:.2f}x"
    )


if __name__ == "__main__":
    main()
