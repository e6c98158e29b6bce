"""`phalanx run` against `torchrun` on the same torchrun-style script: whole command, medians, ratio.

The script is written for torchrun (it calls `init_process_group` itself, reads LOCAL_RANK,
wraps a model in DDP, trains a few steps on a DistributedSampler) and is run unchanged by both
commands, interleaved round after round so that a noisy moment of the machine hurts both alike.

    python bench/run_vs_torchrun.py                # 2 ranks, 7 rounds
    python bench/run_vs_torchrun.py --ranks 2 4 --rounds 5
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SCRIPT = """
import os
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def main():
    dist.init_process_group(backend="gloo")
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(256, 20), torch.randn(256, 1))
    loader = DataLoader(data, batch_size=32, sampler=DistributedSampler(data))
    model = DistributedDataParallel(torch.nn.Linear(20, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for inputs, targets in loader:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
            optimizer.step()
    if int(os.environ["RANK"]) == 0:
        print("done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
"""

_HANG_SECONDS = 120


def _time(command: list[str]) -> float | None:
    """Wall time of one whole command; None if it hung or failed (torch 2.13's gloo workers abort
    at exit now and then under torchrun: such a run is counted and left out of the median)."""
    start = time.perf_counter()
    try:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=_HANG_SECONDS)
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError):
        return None
    return time.perf_counter() - start


def compare(ranks: int, rounds: int, script: str) -> dict[str, float]:
    phalanx = shutil.which("phalanx") or str(Path(sys.executable).with_name("phalanx"))
    commands = {
        "phalanx run": [phalanx, "run", "--nproc-per-node", str(ranks), "--device", "cpu", script],
        "torchrun": [
            *[sys.executable, "-m", "torch.distributed.run"],
            *["--standalone", "--nproc-per-node", str(ranks), script],
        ],
    }
    for command in commands.values():  # warm the file cache once, untimed
        _time(command)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, command in commands.items():
            elapsed = _time(command)
            if elapsed is None:
                print(f"{name}, {ranks} ranks: a run failed or hung (left out of the median)")
            else:
                samples[name].append(elapsed)
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="phalanx run against torchrun")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-") as folder:
        script = Path(folder) / "train_torchrun_style.py"
        script.write_text(textwrap.dedent(SCRIPT))
        for ranks in options.ranks:
            medians = compare(ranks, options.rounds, str(script))
            ours, theirs = medians["phalanx run"], medians["torchrun"]
            print(
                f"{ranks} ranks, torchrun-style script: phalanx run {ours:.2f}s, torchrun {theirs:.2f}s "
                f"(medians of {options.rounds}); phalanx run / torchrun = {ours / theirs:.2f}x"
            )


if __name__ == "__main__":
    main()
