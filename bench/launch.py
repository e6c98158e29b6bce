"""Launch speed: phalanx against the same job written by hand, whole process, medians, ratios.

Every variant is a fresh `python` process that imports torch, starts N ranks that each join a
gloo group and all_reduce one tensor, collects every rank's value, and exits. The variants run
interleaved, round after round, so that a noisy moment of the machine hurts them all alike.

    python bench/launch.py                 # 2 and 8 ranks, 7 rounds
    python bench/launch.py --ranks 2 --rounds 3

Figures: medians in seconds; ratios against the hand-written fork job (the floor: no worker
imports torch again) and the spawn job (what safe hand-written code costs). Then the warm
relaunch: the second and later `launch` calls in one process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HAND_WRITTEN = """
import socket, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

def worker(rank, world, port, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    value = torch.ones(1)
    dist.all_reduce(value)
    queue.put((rank, value.item()))
    dist.destroy_process_group()

if __name__ == "__main__":
    method, world = sys.argv[1], int(sys.argv[2])
    with socket.socket() as probe:  # the usual (racy) free-port trick of hand-written code
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context(method)
    queue = context.Queue()
    processes = [context.Process(target=worker, args=(r, world, port, queue)) for r in range(world)]
    for process in processes:
        process.start()
    results = dict(queue.get() for _ in range(world))
    for process in processes:
        process.join()
    assert sorted(results) == list(range(world)) and set(results.values()) == {float(world)}
"""

PHALANX = """
import sys
import torch
import phalanx as px

def work():
    return px.all_reduce(torch.ones(1), op="sum").item()

if __name__ == "__main__":
    world = int(sys.argv[1])
    assert px.launch(work, platform=px.Platform(device="cpu", n_procs=world)) == [float(world)] * world
"""

WARM = """
import sys, time, statistics
import torch
import phalanx as px

def work():
    return px.all_reduce(torch.ones(1), op="sum").item()

world, repeats = int(sys.argv[1]), int(sys.argv[2])
platform = px.Platform(device="cpu", n_procs=world)
px.launch(work, platform=platform)
times = []
for _ in range(repeats):
    start = time.perf_counter()
    px.launch(work, platform=platform)
    times.append(time.perf_counter() - start)
print(statistics.median(times))
"""


def _time_process(arguments: list[str]) -> float | None:
    """Wall time of one whole process; None if it hung (the hand-written jobs' free-port trick
    can lose its port to another program, and then their parent waits on the queue forever)."""
    start = time.perf_counter()
    try:
        subprocess.run(arguments, check=True, stdout=subprocess.DEVNULL, timeout=_HANG_SECONDS)
    except subprocess.TimeoutExpired:
        return None
    return time.perf_counter() - start


_HANG_SECONDS = 120
_SCRIPTS = tempfile.TemporaryDirectory(prefix="phalanx-bench-")


def _script(source: str) -> str:
    """Write a job to a file: spawned children re-import their main module, which `-c` lacks."""
    path = Path(_SCRIPTS.name) / f"job_{abs(hash(source))}.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


def cold_launches(ranks: int, rounds: int) -> dict[str, float]:
    """Median wall time of each variant's whole process."""
    hand_written, ours = _script(HAND_WRITTEN), _script(PHALANX)
    variants = {
        "fork (hand-written floor)": [sys.executable, hand_written, "fork", str(ranks)],
        "spawn (hand-written)": [sys.executable, hand_written, "spawn", str(ranks)],
        "phalanx": [sys.executable, ours, str(ranks)],
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for arguments in variants.values():  # warm the file cache once, untimed
        _time_process(arguments)
    hung = dict.fromkeys(variants, 0)
    for _ in range(rounds):
        for name, arguments in variants.items():
            elapsed = _time_process(arguments)
            if elapsed is None:
                hung[name] += 1
            else:
                samples[name].append(elapsed)
    for name, count in hung.items():
        if count:
            print(f"{name}, {ranks} ranks: {count} of {rounds} runs hung and were killed after {_HANG_SECONDS} s")
    return {name: statistics.median(times) for name, times in samples.items()}


def warm_relaunch(ranks: int, repeats: int) -> float:
    output = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WARM), str(ranks), str(repeats)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="phalanx launch benchmark")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warm-repeats", type=int, default=15)
    options = parser.parse_args()
    cold = {ranks: cold_launches(ranks, options.rounds) for ranks in options.ranks}
    for ranks, medians in cold.items():
        floor, spawn, ours = medians["fork (hand-written floor)"], medians["spawn (hand-written)"], medians["phalanx"]
        print(
            f"cold launch, {ranks} ranks: phalanx {ours:.3f}s, fork floor {floor:.3f}s, spawn {spawn:.3f}s; "
            f"phalanx/fork = {ours / floor:.2f}x, phalanx/spawn = {ours / spawn:.2f}x, "
            f"fork/spawn = {floor / spawn:.2f}x"
        )
    if len(cold) > 1:
        low, high = min(cold), max(cold)
        print(
            f"{high} ranks against {low}: phalanx {cold[high]['phalanx'] / cold[low]['phalanx']:.2f}x, "
            f"spawn {cold[high]['spawn (hand-written)'] / cold[low]['spawn (hand-written)']:.2f}x"
        )
    for ranks in options.ranks:
        print(f"warm relaunch, {ranks} ranks: {warm_relaunch(ranks, options.warm_repeats) * 1000:.0f} ms (median)")


if __name__ == "__main__":
    main()
