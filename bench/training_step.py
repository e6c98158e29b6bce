"""Training-step throughput: phalanx's helpers against the same loop written by hand.

Both loops run in the same 2-rank job, alternating round by round: phalanx's
`prepare_model` + `dataloader` (sharding, set_epoch and device moves done for you) against
DistributedDataParallel + DistributedSampler + DataLoader with `set_epoch` and `.to(device)`
by hand. Each round times a fixed number of steps after a warm-up; medians per variant.

    python bench/training_step.py                  # 2 ranks on CPU
    python bench/training_step.py --device gpu --n-procs 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import phalanx as px


def _network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def _dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(16384, 256, generator=generator)
    return TensorDataset(inputs, torch.randint(0, 10, (16384,), generator=generator))


def _steps(model, optimizer, batches, device, count: int, move: bool) -> float:
    loss_function = nn.CrossEntropyLoss()
    done = 0
    start = time.perf_counter()
    while done < count:
        for x, y in batches():
            if move:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_function(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == count:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def compare(rounds: int, steps: int, batch_size: int) -> dict[str, float]:
    device = px.device()
    dataset = _dataset()
    ours_model = px.prepare_model(_network())
    ours_optimizer = torch.optim.SGD(ours_model.parameters(), lr=0.01)
    ours_loader = px.dataloader(dataset, batch_size=batch_size, shuffle=True)

    hand_model = _network().to(device)
    hand_model = DistributedDataParallel(hand_model, device_ids=[device.index] if device.type == "cuda" else None)
    hand_optimizer = torch.optim.SGD(hand_model.parameters(), lr=0.01)
    sampler = DistributedSampler(dataset, shuffle=True)
    hand_loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, pin_memory=device.type == "cuda")
    epoch = [0]

    def hand_batches():
        sampler.set_epoch(epoch[0])
        epoch[0] += 1
        return hand_loader

    samples: dict[str, list[float]] = {"phalanx": [], "hand-written": []}
    _steps(ours_model, ours_optimizer, lambda: ours_loader, device, steps // 2, move=False)  # warm-up
    _steps(hand_model, hand_optimizer, hand_batches, device, steps // 2, move=True)
    for round_index in range(rounds):
        order = ["phalanx", "hand-written"] if round_index % 2 == 0 else ["hand-written", "phalanx"]
        for name in order:
            px.barrier()
            if name == "phalanx":
                rate = _steps(ours_model, ours_optimizer, lambda: ours_loader, device, steps, move=False)
            else:
                rate = _steps(hand_model, hand_optimizer, hand_batches, device, steps, move=True)
            samples[name].append(rate)
    return {name: statistics.median(rates) for name, rates in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="training-step throughput benchmark")
    parser.add_argument("--n-procs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    options = parser.parse_args()
    platform = px.Platform(device=options.device, n_procs=options.n_procs)
    results = px.launch(compare, options.rounds, options.steps, options.batch_size, platform=platform)
    ours = statistics.median(r["phalanx"] for r in results)
    hand = statistics.median(r["hand-written"] for r in results)
    print(
        f"training step, {options.n_procs} ranks on {options.device}: phalanx {ours:.1f} steps/s, "
        f"hand-written DDP {hand:.1f} steps/s; phalanx/hand-written = {ours / hand:.3f}x"
    )


if __name__ == "__main__":
    main()
