"""Import cost: `import phalanx` on top of `import torch`, in fresh interpreters, medians.

Users import torch anyway, so what phalanx adds is the time of `import phalanx` once torch is
loaded (the zygote fork included: it happens at import). Two figures, both from fresh `python`
processes run interleaved round after round, so that a noisy moment hurts both variants alike:

- in-process: `import torch`, then the clock around `import phalanx` alone;
- whole process: `python -c "import torch; import phalanx"` against `python -c "import torch"`,
  start to exit (this also counts what phalanx costs at exit: stopping the zygote).

The interpreters run with a bytecode cache, as every installed package has one: without it
(PYTHONDONTWRITEBYTECODE=1 over an editable checkout, as on this project's machines) every
import compiles phalanx's modules from source again, which is most of the time measured. The
untimed first run writes the cache (`__pycache__` folders, ignored by git).

    python bench/import_time.py               # 21 rounds
    python bench/import_time.py --rounds 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

_TIMED_IMPORT = """
import time
import torch
start = time.perf_counter()
import phalanx
print(time.perf_counter() - start)
"""

_ENVIRONMENT = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
_TARGET_SECONDS = 0.050  # issue 8: `import phalanx` on top of `import torch` under 50 ms


def _whole_process(source: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", source], check=True, stdout=subprocess.DEVNULL, env=_ENVIRONMENT)
    return time.perf_counter() - start


def _in_process() -> float:
    output = subprocess.run(
        [sys.executable, "-c", _TIMED_IMPORT], check=True, capture_output=True, text=True, env=_ENVIRONMENT
    )
    return float(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="phalanx import-time benchmark")
    parser.add_argument("--rounds", type=int, default=21)
    options = parser.parse_args()
    _in_process()  # untimed: warms the file cache and writes the bytecode cache
    torch_alone, torch_and_phalanx, phalanx_alone = [], [], []
    for _ in range(options.rounds):
        torch_alone.append(_whole_process("import torch"))
        torch_and_phalanx.append(_whole_process("import torch; import phalanx"))
        phalanx_alone.append(_in_process())
    bare, both, ours = (statistics.median(times) for times in (torch_alone, torch_and_phalanx, phalanx_alone))
    verdict = "under" if ours < _TARGET_SECONDS else "OVER"
    print(
        f"import phalanx after import torch ({options.rounds} rounds, medians): {ours * 1000:.1f} ms in-process "
        f"({verdict} the {_TARGET_SECONDS * 1000:.0f} ms target); whole process {both:.3f}s against {bare:.3f}s "
        f"for import torch alone: +{(both - bare) * 1000:.0f} ms, {both / bare:.3f}x"
    )


if __name__ == "__main__":
    main()
