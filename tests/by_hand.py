"""Processes started by hand, as a user would in several terminals: one interpreter each, no launcher.

They run in a network namespace of their own (see `tests.namespaces`), so the port they meet
at by default (torchrun's 29500) is theirs alone: no free-port guess that another test could
race, and the default place (127.0.0.1:29500) is what the test exercises.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.namespaces import one_host

# What a terminal would not have: a launcher's place, or a rendezvous address given by hand.
PLACE_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID",)


def run_by_hand(
    source: str, tmp_path: Path, world_size: int = 2, secret: str = "cd" * 32
) -> list[tuple[int, str, str]]:
    """Run `source` once per process id (its first argument), together; (exit code, stdout, stderr) of each.

    Every process gets the same job secret, as the docs tell users to give them.
    """
    script = tmp_path / "by_hand.py"
    script.write_text(source)
    env = {key: value for key, value in os.environ.items() if key not in PLACE_VARIABLES + LAUNCHER_VARIABLES}
    env["PHALANX_JOB_SECRET"] = secret
    with one_host("phx-hand") as host:
        processes = [
            subprocess.Popen(
                ["ip", "netns", "exec", host, sys.executable, str(script), str(process_id)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=tmp_path,
                env=env,
            )
            for process_id in range(world_size)
        ]
        try:
            outputs = [process.communicate(timeout=90) for process in processes]
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
    return [(process.returncode, out, err) for process, (out, err) in zip(processes, outputs, strict=True)]
