"""Result transfer: a 256 MiB tensor returned from each of 2 ranks, shared memory against a pipe.

One process launches the same job again and again (warm launches), interleaving three
variants: the default (large CPU tensors go through /dev/shm files), the same with
`PHALANX_SHARED_MEMORY=0` (the tensor is pickled through the result pipe, as a hand-written
launcher does it), and a floor in which each rank builds the tensor but returns nothing.
Figures are medians; the transfer time of a variant is its median minus the floor's.

    python bench/results.py                 # 256 MiB, 2 ranks, 5 rounds
    python bench/results.py --mib 64 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import phalanx as px


def _make(mib: int, keep: bool):
    value = torch.full((mib, 1 << 18), float(px.get_rank()))  # mib MiB of float32
    return value if keep else None


VARIANTS = {"shared memory": ("1", True), "pipe": ("0", True), "no value (floor)": ("1", False)}


def main() -> None:
    parser = argparse.ArgumentParser(description="result transfer benchmark")
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--n-procs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    platform = px.Platform(device="cpu", n_procs=options.n_procs)
    px.launch(_make, 1, False, platform=platform)  # the first launch starts the zygote
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for round_index in range(options.rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            sharing, keep = VARIANTS[name]
            os.environ["PHALANX_SHARED_MEMORY"] = sharing
            start = time.perf_counter()
            values = px.launch(_make, options.mib, keep, platform=platform)
            samples[name].append(time.perf_counter() - start)
            if keep:
                assert values[-1][0, 0].item() == options.n_procs - 1
            del values
    medians = {name: statistics.median(times) for name, times in samples.items()}
    floor = medians["no value (floor)"]
    shared, pipe = medians["shared memory"], medians["pipe"]
    figures = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in medians.items())
    print(f"{options.mib} MiB from each of {options.n_procs} ranks, medians of {options.rounds}: {figures}")
    print(
        f"pipe/shared memory = {pipe / shared:.1f}x (whole launch), "
        f"{(pipe - floor) / max(shared - floor, 1e-3):.1f}x (transfer only)"
    )


if __name__ == "__main__":
    main()
