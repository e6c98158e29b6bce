"""Where a cold launch spends its time: the job of `compare.py`, cut into phases, per launcher.

The whole-process figure of `compare.py` is mostly `import torch` and the interpreter's exit,
which every launcher pays alike and which vary by tens of milliseconds from run to run. This
runs the same jobs with time stamps printed after `import torch`, before the launch and after
it, so that the part each launcher is responsible for can be compared on its own:

- torch: interpreter start and `import torch`;
- imports: the launcher's own imports and set-up, up to the launch call;
- launch: the launch call, from start to every rank's value (or end) back in the caller;
- exit: from there to the process's end, as its parent sees it.

    bench/.venv-compare/bin/python bench/phases.py                   # phalanx, DDPW, Accelerate
    bench/.venv-compare/bin/python bench/phases.py --ranks 8 --rounds 21 --only phalanx ddpw
    python bench/phases.py --only phalanx                             # without the comparison venv

Medians over interleaved rounds, in milliseconds, and each launcher's difference to phalanx.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_PHASES = ("torch", "imports", "launch", "exit", "total")
_MARK = "PHASE-MARK"


def _load_compare():
    spec = importlib.util.spec_from_file_location("phalanx_bench_compare", _HERE / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _marked_common(common: str) -> str:
    """compare.py's shared job code, printing a time stamp after `import torch` and around the launch."""
    replacements = [
        ("import torch\n", f"import torch\nprint('{_MARK} torch', time.time(), flush=True)\n"),
        (
            "def run(launch, check):\n    try:\n",
            f"def run(launch, check):\n    print('{_MARK} imports', time.time(), flush=True)\n    try:\n",
        ),
        (
            '    if FAIL_FILE:\n        print(f"RETURNED',
            f"    print('{_MARK} launch', time.time(), flush=True)\n    if FAIL_FILE:\n        print(f\"RETURNED",
        ),
    ]
    for old, new in replacements:
        if common.count(old) != 1:
            raise SystemExit(f"bench/compare.py changed: cannot place a time stamp at {old!r}")
        common = common.replace(old, new)
    return common


def _run(script: Path, ranks: int, environment: dict[str, str], scratch: Path) -> tuple[float, ...] | None:
    """One whole process; its phases in seconds, or None if it failed."""
    out_path, err_path = scratch / "stdout", scratch / "stderr"
    with out_path.open("w") as out, err_path.open("w") as err:
        start = time.time()
        process = subprocess.Popen(
            [sys.executable, str(script), str(ranks)],
            stdout=out,
            stderr=err,
            env=environment,
            cwd=scratch,
            start_new_session=True,
        )
        process.wait()
        end = time.time()
    if process.returncode != 0:
        print(f"{script.stem}: exit {process.returncode}: {err_path.read_text()[-600:]}", file=sys.stderr)
        return None
    marks = {}
    for line in out_path.read_text().splitlines():
        words = line.split()
        if words[:1] == [_MARK]:
            marks[words[1]] = float(words[2])
    torch_done, launch_called, launch_done = marks["torch"], marks["imports"], marks["launch"]
    return (
        torch_done - start,
        launch_called - torch_done,
        launch_done - launch_called,
        end - launch_done,
        end - start,
    )


def main() -> None:
    compare = _load_compare()
    forkable = [name for name in compare._JOBS if name not in ("torchrun", "torchrunx")]  # ranks outside the caller
    parser = argparse.ArgumentParser(description="a cold launch cut into phases, per launcher")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--only", nargs="+", choices=forkable, default=["phalanx", "ddpw", "accelerate"])
    options = parser.parse_args()
    names = [name for name in options.only if importlib.util.find_spec(compare._MODULES[name]) is not None]
    for missing in sorted(set(options.only) - set(names)):
        print(f"{compare._LABELS[missing]}: not installed here (run bench/setup-compare-env.sh)")
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    common = _marked_common(compare._COMMON)
    with tempfile.TemporaryDirectory(prefix="phalanx-phases-") as folder:
        scratch = Path(folder)
        scripts = {}
        for name in names:
            scripts[name] = scratch / f"job_{name}.py"
            scripts[name].write_text(common + compare._JOBS[name])
        for ranks in options.ranks:
            for name in names:  # untimed: bytecode caches, and a check that the job runs here
                if _run(scripts[name], ranks, environment, scratch) is None:
                    raise SystemExit(f"{compare._LABELS[name]} cannot run the job here")
            figures: dict[str, list[tuple[float, ...]]] = {name: [] for name in names}
            for _ in range(options.rounds):
                for name in names:
                    phases = _run(scripts[name], ranks, environment, scratch)
                    if phases is not None:
                        figures[name].append(phases)
            medians = {
                name: [statistics.median(column) * 1000 for column in zip(*runs, strict=True)]
                for name, runs in figures.items()
            }
            print(f"{ranks} ranks, {options.rounds} rounds, medians in ms: " + ", ".join(_PHASES))
            for name, values in medians.items():
                shown = "  ".join(f"{phase} {value:7.1f}" for phase, value in zip(_PHASES, values, strict=True))
                print(f"  {compare._LABELS[name]:40s} {shown}")
            ours = medians.get("phalanx")
            for name, values in medians.items():
                if ours is None or name == "phalanx":
                    continue
                shown = "  ".join(f"{phase} {a - b:+6.1f}" for phase, a, b in zip(_PHASES, ours, values, strict=True))
                print(f"  {'phalanx - ' + compare._LABELS[name]:40s} {shown}")


if __name__ == "__main__":
    main()
