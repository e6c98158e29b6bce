"""Churn: many quick store connections and launches in a row, and how many of them stall.

c10d names every socket it connects with a reverse DNS lookup (see phalanx.name_lookups).
Where the DNS server is remote and now and then loses a reply, that costs the C library's
5 s timeout, in the caller and in every rank, at random. Two figures, each in one line:

- store connections: `--connections` clients connect, one after another, to a store this
  process hosts on loopback, alternately as plain c10d code does (`dist.TCPStore`: the
  baseline) and through phalanx (`phalanx.rendezvous.connect_store`); medians, the slowest,
  and how many took longer than `--stall` seconds;
- launches: `--launches` back-to-back launches of the all_reduce job of `bench/launch.py`
  in one process with `Platform(timeout=1)`, per rank count: medians, the slowest, stalls
  and failures (a rank that stalls longer than the timeout fails its launch).

The figures depend on this machine's DNS server: one that answers every query at once (a
local caching resolver) shows no stall for either; that is the case phalanx does not rely on.

    python bench/churn.py                                   # 200 connections; 400 launches at 2, 200 at 8 ranks
    python bench/churn.py --connections 0 --launches 100    # launches only
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import phalanx as px
from phalanx.job_secret import new_secret
from phalanx.rendezvous import connect_store, host_store

_TIMEOUT = timedelta(seconds=30)


def _summary(seconds: list[float], stall: float) -> str:
    stalled = sum(value > stall for value in seconds)
    return (
        f"median {statistics.median(seconds) * 1e3:.1f} ms, slowest {max(seconds) * 1e3:.0f} ms, "
        f"{stalled} of {len(seconds)} over {stall:g} s"
    )


def store_connections(count: int, stall: float) -> None:
    store = host_store("127.0.0.1", None, _TIMEOUT, new_secret())
    ways = {
        "dist.TCPStore": lambda: dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=_TIMEOUT),
        "phalanx": lambda: connect_store("127.0.0.1", store.port, _TIMEOUT, None),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(count):
        for name, connect in ways.items():
            start = time.perf_counter()
            client = connect()
            seconds[name].append(time.perf_counter() - start)
            del client
    print(
        f"store connections ({count} each, interleaved): "
        + " | ".join(f"{name}: {_summary(values, stall)}" for name, values in seconds.items())
    )


def _all_reduce() -> float:
    value = torch.ones(1)
    dist.all_reduce(value)
    return value.item()


def launches(count: int, ranks: int, stall: float) -> None:
    platform = px.Platform(device="cpu", n_procs=ranks, timeout=1)
    seconds, failures = [], []
    for index in range(count):
        start = time.perf_counter()
        try:
            px.launch(_all_reduce, platform=platform)
        except px.PhalanxError as error:
            failures.append((index, type(error).__name__, str(error).splitlines()[0][:160]))
        seconds.append(time.perf_counter() - start)
    first = f"; first: launch {failures[0][0]}, {failures[0][1]}: {failures[0][2]}" if failures else ""
    print(f"launches, {ranks} ranks, timeout 1 s: {_summary(seconds, stall)}, {len(failures)} failed{first}")


def main() -> None:
    parser = argparse.ArgumentParser(description="stalls under many quick connections and launches")
    parser.add_argument("--connections", type=int, default=200, help="store connections each way (0: none)")
    parser.add_argument("--launches", type=int, nargs="+", default=[400, 200], help="launches per rank count")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--stall", type=float, default=0.5, help="seconds above which a run counts as stalled")
    options = parser.parse_args()
    if options.connections:
        store_connections(options.connections, options.stall)
    counts = options.launches + options.launches[-1:] * (len(options.ranks) - len(options.launches))
    for ranks, count in zip(options.ranks, counts, strict=False):
        launches(count, ranks, options.stall)


if __name__ == "__main__":
    main()
