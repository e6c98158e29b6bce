"""The smallest real launch: two CPU processes each compute, sum over ranks, and return.

python examples/hello.py              # 2 ranks
python examples/hello.py --n-procs 4
"""

from __future__ import annotations

import argparse

import torch

import phalanx as px


def work(scale: float) -> float:
    mine = torch.full((3,), float(px.get_rank() + 1)) * scale
    total = px.all_reduce(mine, op="sum")
    print(f"rank {px.get_rank()} of {px.get_world_size()} on {px.device()}: sum over ranks = {total.tolist()}")
    return total.sum().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-procs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args()
    results = px.launch(work, 2.0, platform=px.Platform(device=options.device, n_procs=options.n_procs))
    print("results by rank:", results)


if __name__ == "__main__":
    main()
