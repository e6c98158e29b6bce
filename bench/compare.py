"""phalanx against the launchers users would pick instead: the same job, whole process, medians, ratios.

Every launcher runs the job of `bench/launch.py` (a fresh `python` process imports torch, starts N
ranks on CPU that join a gloo group and all_reduce one tensor, and exits) written the way its own
documentation writes it: torchrun, Lightning Fabric's `ddp_spawn`, Accelerate's `notebook_launcher`,
Ignite's `Parallel`, DDPW's `Wrapper` and torchrunx's `Launcher`. The launchers are installed only
in the benchmark's own environment, never as dependencies of phalanx:

    bash bench/setup-compare-env.sh
    bench/.venv-compare/bin/python bench/compare.py                  # 2 and 8 ranks, 3 rounds
    bench/.venv-compare/bin/python bench/compare.py --ranks 2 --rounds 5 --only phalanx torchrun

Two figures per rank count, each the median over rounds that run every launcher in turn (the
machine is shared and noisy, so a noisy moment hurts them all alike), with each launcher's ratio
to phalanx:

- launch: wall time of the whole process, interpreter start to exit;
- raise to error: after the first all_reduce the last rank records the wall-clock time and raises
  while the others wait for it in a second all_reduce; the figure is the time until the caller
  catches an error (torchrun: until the `torchrun` process exits non-zero). Runs capped at
  `--cap` seconds are reported as "> cap" and their whole process group is killed.

Every process runs with a bytecode cache, as installed packages have: PYTHONDONTWRITEBYTECODE
is dropped from the jobs' environment, so the untimed first run of each job writes the cache of
an editable checkout of phalanx too (its `__pycache__` folders are ignored by git); otherwise
phalanx alone would compile its modules from source in every run and in every rank.

A launcher that cannot run here gets a line saying why instead of a figure. Every run's process
group is checked after the launcher's process has exited: processes it left behind are reported
and killed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# What every launcher's job shares: the work, the free-port trick of hand-written code (for the
# launchers whose default port is a fixed number that collides with any other job), and the way
# the caller reports an error it caught.
_COMMON = """
import os, socket, sys, time
import torch
import torch.distributed as dist

WORLD = int(sys.argv[1])
FAIL_FILE = sys.argv[2] if len(sys.argv) > 2 else ""


def job(rank):
    value = torch.ones(1)
    dist.all_reduce(value)
    if FAIL_FILE:
        if rank == WORLD - 1:
            with open(FAIL_FILE, "w") as record:
                record.write(repr(time.time()))
            raise ValueError("raised on purpose by the benchmark")
        dist.all_reduce(value)  # the others wait for the failed rank here
    return value.item()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(launch, check):
    try:
        values = launch()
    except BaseException as error:
        print(f"CAUGHT {time.time()!r} {type(error).__name__} {'raised on purpose' in str(error)}", flush=True)
        sys.exit(1)
    if FAIL_FILE:
        print(f"RETURNED {time.time()!r}", flush=True)
    elif not check(values):
        sys.exit(f"wrong result: {values!r}")
"""

_JOBS = {
    "phalanx": """
import phalanx as px

def work():
    return job(px.get_rank())

if __name__ == "__main__":
    platform = px.Platform(device="cpu", n_procs=WORLD)
    run(lambda: px.launch(work, platform=platform), lambda values: values == [float(WORLD)] * WORLD)
""",
    "torchrun": """
if __name__ == "__main__":
    dist.init_process_group("gloo")
    assert job(dist.get_rank()) == WORLD
    dist.destroy_process_group()
""",
    "fabric": """
from lightning_fabric import Fabric

def work(fabric):
    return job(fabric.global_rank)

if __name__ == "__main__":
    fabric = Fabric(accelerator="cpu", strategy="ddp_spawn", devices=WORLD)
    run(lambda: fabric.launch(work), lambda value: value == WORLD)
""",
    "accelerate": """
from accelerate import PartialState, notebook_launcher

def work():
    assert job(PartialState(cpu=True).process_index) == WORLD

if __name__ == "__main__":
    run(lambda: notebook_launcher(work, num_processes=WORLD, use_port=str(free_port())), lambda value: True)
""",
    "ignite": """
import ignite.distributed as idist

def work(local_rank):
    assert job(idist.get_rank()) == WORLD

def launch():
    with idist.Parallel(backend="gloo", nproc_per_node=WORLD, master_port=free_port()) as parallel:
        parallel.run(work)

if __name__ == "__main__":
    run(launch, lambda value: True)
""",
    "ddpw": """
import ddpw.platform
from ddpw import Platform, Wrapper

# DDPW runs a single process for device="cpu"; its only multi-process path is device="gpu", which
# caps the process count by the visible GPUs. The task never touches CUDA, so let it see WORLD.
ddpw.platform.device_count = lambda: WORLD

def task(global_rank, local_rank, group, args):
    assert job(global_rank) == WORLD

if __name__ == "__main__":
    platform = Platform(device="gpu", n_gpus=WORLD, master_addr="127.0.0.1", master_port=str(free_port()),
                        verbose=False)
    run(lambda: Wrapper(platform).start(task), lambda value: True)
""",
    "torchrunx": """
import torchrunx

def work():
    return job(int(os.environ["RANK"]))

if __name__ == "__main__":
    launcher = torchrunx.Launcher(hostnames=["localhost"], workers_per_host=WORLD, backend="gloo")
    run(lambda: launcher.run(work), lambda result: [result.rank(r) for r in range(WORLD)] == [float(WORLD)] * WORLD)
""",
}

# How each launcher is named in the report.
_LABELS = {
    "phalanx": "phalanx",
    "torchrun": "torchrun",
    "fabric": "Fabric ddp_spawn",
    "accelerate": "Accelerate notebook_launcher",
    "ignite": "Ignite Parallel",
    "ddpw": "DDPW Wrapper",
    "torchrunx": "torchrunx Launcher",
}

# The module each job imports, to tell "not installed here" apart from "fails here".
_MODULES = {
    "phalanx": "phalanx",
    "torchrun": "torch",
    "fabric": "lightning_fabric",
    "accelerate": "accelerate",
    "ignite": "ignite",
    "ddpw": "ddpw",
    "torchrunx": "torchrunx",
}

_ENVIRONMENT = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
_STARTUP_LIMIT = 120  # seconds a run may take before its rank raises (or, for a launch, in all)
_WORKDIR = tempfile.TemporaryDirectory(prefix="phalanx-compare-")


@dataclass
class Run:
    """One whole process of one launcher: how long it ran and what its caller saw."""

    seconds: float | None  # wall time, start to exit; None when it was killed
    returncode: int | None
    raised_at: float | None = None  # the rank's wall clock when it raised
    seen_at: float | None = None  # the caller's wall clock when it caught the error, or the exit
    exited_at: float | None = None  # the wall clock when the launcher's process exited
    seen_as: str = ""  # the exception type the caller caught, "exit N", or "no error"
    names_cause: bool | None = None  # the caught error mentions the rank's ValueError
    capped: bool = False
    left_behind: int = 0
    stderr_tail: str = ""

    @property
    def error_delay(self) -> float | None:
        if self.raised_at is None or self.seen_at is None:
            return None
        return self.seen_at - self.raised_at


@dataclass
class Figures:
    launch: list[float] = field(default_factory=list)
    launch_by_round: list[float | None] = field(default_factory=list)  # None: that round's run failed
    error: list[Run] = field(default_factory=list)
    problem: str = ""  # why this launcher has no figure, if it has none
    left_behind: int = 0


def _arguments(name: str, script: str, ranks: int, fail_file: str | None) -> list[str]:
    tail = [str(ranks)] + ([fail_file] if fail_file else [])
    if name == "torchrun":
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        return [*runner, script, *tail]
    return [sys.executable, script, *tail]


def _group_members(group: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _parent, process_group = stat.rpartition(")")[2].split()[:3]
        if int(process_group) == group and state != "Z":
            members.append(int(entry))
    return members


def _reap_group(group: int, grace: float = 2.0) -> int:
    """Give the launcher's children `grace` seconds to finish after it exits; kill and count the rest."""
    deadline = time.monotonic() + grace
    while (members := _group_members(group)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if members:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(members)


def _read_float(path: Path) -> float | None:
    try:
        return float(path.read_text())
    except (OSError, ValueError):  # not written yet, or half written
        return None


def run_once(name: str, script: str, ranks: int, fail: bool, cap: float) -> Run:
    """One whole process in its own session, so that everything it starts can be found and killed."""
    scratch = Path(tempfile.mkdtemp(dir=_WORKDIR.name))  # torchrunx writes its logs to the current folder
    fail_file = scratch / "raised" if fail else None
    stdout_path, stderr_path = scratch / "stdout", scratch / "stderr"
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(
            _arguments(name, script, ranks, str(fail_file) if fail_file else None),
            cwd=scratch,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            env=_ENVIRONMENT,
        )
    ended: dict[str, float] = {}

    def wait() -> None:
        process.wait()
        ended["perf"], ended["wall"] = time.perf_counter(), time.time()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    raised_at, capped = None, False
    while waiter.is_alive():
        waiter.join(0.05)
        if fail_file is not None and raised_at is None:
            raised_at = _read_float(fail_file)
        limit = cap if raised_at is not None else _STARTUP_LIMIT
        since = time.time() - raised_at if raised_at is not None else time.perf_counter() - start
        if waiter.is_alive() and since > limit:
            capped = True
            os.killpg(process.pid, signal.SIGKILL)
            waiter.join()
    if fail_file is not None and raised_at is None:
        raised_at = _read_float(fail_file)
    left_behind = 0 if capped else _reap_group(process.pid)
    result = Run(
        seconds=None if capped else ended["perf"] - start,
        returncode=None if capped else process.returncode,
        raised_at=raised_at,
        exited_at=None if capped else ended["wall"],
        capped=capped,
        left_behind=left_behind,
        stderr_tail="\n".join(stderr_path.read_text(errors="replace").strip().splitlines()[-6:]),
    )
    if fail and not capped:
        for line in stdout_path.read_text(errors="replace").splitlines():
            words = line.split()
            if words[:1] == ["CAUGHT"]:
                result.seen_at, result.seen_as, result.names_cause = float(words[1]), words[2], words[3] == "True"
            elif words[:1] == ["RETURNED"]:
                result.seen_as = "no error"
        if result.seen_at is None and process.returncode != 0:  # a command-line launcher: its exit is the error
            result.seen_at, result.seen_as = ended["wall"], f"exit {process.returncode}"
        elif not result.seen_as:
            result.seen_as = f"no error (exit {process.returncode})"
    return result


def _script(name: str) -> str:
    path = Path(_WORKDIR.name) / f"job_{name}.py"
    path.write_text(textwrap.dedent(_COMMON) + textwrap.dedent(_JOBS[name]))
    return str(path)


def measure(names: list[str], ranks: int, rounds: int, cap: float, with_errors: bool = True) -> dict[str, Figures]:
    """Interleaved rounds of every launcher that works here: the launch, then (`with_errors`) the failure."""
    figures = {name: Figures() for name in names}
    scripts = {}
    for name in names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            figures[name].problem = f"`{_MODULES[name]}` is not installed here (run bench/setup-compare-env.sh)"
            continue
        scripts[name] = _script(name)
        check = run_once(name, scripts[name], ranks, fail=False, cap=cap)  # untimed: file cache, and a check
        if check.returncode != 0:
            why = "hung" if check.capped else f"exit {check.returncode}"
            figures[name].problem = f"the job fails here ({why}): {check.stderr_tail[-400:]!r}"
            del scripts[name]
    for _ in range(rounds):
        for name, script in scripts.items():
            outcome = run_once(name, script, ranks, fail=False, cap=cap)
            figures[name].left_behind += outcome.left_behind
            ok = outcome.returncode == 0 and outcome.seconds is not None
            if ok:
                figures[name].launch.append(outcome.seconds)
            figures[name].launch_by_round.append(outcome.seconds if ok else None)
        if not with_errors:
            continue
        for name, script in scripts.items():
            outcome = run_once(name, script, ranks, fail=True, cap=cap)
            figures[name].left_behind += outcome.left_behind
            figures[name].error.append(outcome)
    return figures


def _ratio(theirs: float | None, ours: float | None) -> str:
    return f"{theirs / ours:.2f}x" if theirs is not None and ours else "n/a"


def _error_summary(runs: list[Run], cap: float) -> tuple[float | None, str]:
    """Median delay (a run whose caller never saw an error counts as endless) and what the caller saw."""
    if not runs:
        return None, "no run"
    median = statistics.median(run.error_delay if run.error_delay is not None else float("inf") for run in runs)
    notes = []
    caught = [run for run in runs if run.error_delay is not None]
    if caught:
        named = {run.names_cause for run in caught if run.names_cause is not None}
        cause = "" if not named else (" naming the ValueError" if named == {True} else " not naming the ValueError")
        notes.append("/".join(sorted({run.seen_as for run in caught})) + cause)
    silent = [run for run in runs if run.error_delay is None and not run.capped]
    if silent:
        after = statistics.median(
            run.exited_at - run.raised_at for run in silent if run.exited_at is not None and run.raised_at is not None
        )
        kinds = "/".join(sorted({run.seen_as for run in silent}))
        notes.append(f"{len(silent)} of {len(runs)} ended with {kinds}, {after:.2f}s after the raise")
    capped = sum(run.capped for run in runs)
    if capped:
        notes.append(f"{capped} of {len(runs)} still running {cap:.0f}s after the raise, killed")
    return (None if median == float("inf") else median), "; ".join(notes)


def _paired_ratio(ours: Figures, theirs: Figures) -> float | None:
    """Median over rounds of phalanx's time over theirs in the same round: a slow moment of the
    shared machine (or a slow `import torch`) hits both runs of a round, so it cancels out."""
    pairs = [a / b for a, b in zip(ours.launch_by_round, theirs.launch_by_round, strict=False) if a and b]
    return statistics.median(pairs) if pairs else None


def report(ranks: int, rounds: int, cap: float, figures: dict[str, Figures], with_errors: bool = True) -> None:
    ours = figures.get("phalanx")
    our_launch = statistics.median(ours.launch) if ours and ours.launch else None
    our_error = _error_summary(ours.error, cap)[0] if ours else None
    launches, errors = [], []
    fastest_launch: tuple[float, str] | None = None
    fastest_error: tuple[float, str] | None = None
    for name, figure in figures.items():
        label = _LABELS[name]
        if figure.problem:
            print(f"{label}, {ranks} ranks: cannot run here: {figure.problem}")
            continue
        leftover = f", left {figure.left_behind} processes behind in all" if figure.left_behind else ""
        if figure.launch:
            median = statistics.median(figure.launch)
            launches.append(f"{label} {median:.2f}s ({_ratio(median, our_launch)})")
            if name != "phalanx" and (fastest_launch is None or median < fastest_launch[0]):
                fastest_launch = (median, label)
        else:
            launches.append(f"{label} no successful run")
        delay, note = _error_summary(figure.error, cap)
        if delay is not None:
            shown = f"{delay:.2f}s"
        else:  # the median run never showed the caller an error: still running at the cap, or ended as if fine
            shown = f"> {cap:.0f}s" if any(run.capped for run in figure.error) else "never"
        errors.append(f"{label} {shown} ({_ratio(delay, our_error) if delay is not None else 'n/a'}; {note}{leftover})")
        if name != "phalanx" and delay is not None and (fastest_error is None or delay < fastest_error[0]):
            fastest_error = (delay, label)
    print(f"launch, {ranks} ranks ({rounds} rounds, medians, ratio to phalanx): " + " | ".join(launches))
    if fastest_launch and our_launch:
        print(
            f"launch, {ranks} ranks: phalanx / fastest other ({fastest_launch[1]}) = "
            f"{our_launch / fastest_launch[0]:.2f}x"
        )
    paired = [
        f"{_LABELS[name]} {ratio:.3f}x"
        for name, figure in figures.items()
        if name != "phalanx" and ours and (ratio := _paired_ratio(ours, figure)) is not None
    ]
    if paired:
        print(f"launch, {ranks} ranks: median of per-round ratios phalanx / other: " + " | ".join(paired))
    if not with_errors:
        return
    print(f"raise to error, {ranks} ranks ({rounds} rounds, medians, ratio to phalanx): " + " | ".join(errors))
    if fastest_error and our_error is not None:
        print(
            f"raise to error, {ranks} ranks: phalanx {our_error:.2f}s, fastest other ({fastest_error[1]}) "
            f"{fastest_error[0]:.2f}s, phalanx / fastest other = {our_error / fastest_error[0]:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="phalanx against other launchers")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cap", type=float, default=20.0, help="seconds from the raise before a run is killed")
    parser.add_argument("--only", nargs="+", choices=list(_JOBS), metavar="LAUNCHER", help=", ".join(_JOBS))
    parser.add_argument("--launch-only", action="store_true", help="skip the raise-to-error runs")
    options = parser.parse_args()
    names = options.only or list(_JOBS)
    if "phalanx" not in names:
        names.insert(0, "phalanx")
    with_errors = not options.launch_only
    for ranks in options.ranks:
        figures = measure(names, ranks, options.rounds, options.cap, with_errors)
        report(ranks, options.rounds, options.cap, figures, with_errors)


if __name__ == "__main__":
    main()
