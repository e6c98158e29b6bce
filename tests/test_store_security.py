"""A stranger who reaches the job's store can neither run code nor forge a value nor plant an address.

Each attack is one a plain `TCPStore` client can make: it sets keys phalanx or gloo reads. The
jobs that must listen where others reach them (several nodes, torchrun, ranks started by hand)
run inside a network namespace of their own, so that their fixed ports meet nothing else; the
stranger runs in it too. Every attack must end with no code run (the marker file never appears),
no forged value returned, and an error that names the intrusion.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import psutil
import pytest
import torch.distributed as dist

import phalanx as px
from phalanx.rendezvous import SignedStore, host_store
from phalanx.runners import zygote
from tests.conftest import run_script
from tests.namespaces import one_host

SECRET = "cd" * 32
INTRUSION = "the store holds a value this job did not write"
PORT = 29400  # inside the test's own namespace: nothing else is there


def _code_carrying_pickle(marker) -> bytes:
    """A pickle that, if anyone unpickled it, would create `marker` (it must never appear)."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Payload())


# -- the signed store itself --------------------------------------------------------------------


def test_signed_store_round_trips_and_refuses_what_a_plain_client_wrote(tmp_path):
    store = host_store("127.0.0.1", None, timedelta(seconds=10), b"k" * 32)
    stranger = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=10))
    store.set("mine", b"value")
    assert store.get("mine") == b"value"
    assert store.multi_get(["mine"]) == [b"value"]
    assert store.compare_set("flag", "", "up") == b"up"
    assert store.compare_set("flag", "up", "down") == b"down"
    stranger.set("planted", _code_carrying_pickle(tmp_path / "marker"))
    with pytest.raises(px.LaunchError, match=rf"{INTRUSION} \(key 'planted'\).*127\.0\.0\.1:{store.port}"):
        store.get("planted")
    stranger.set("mine", b"forged")  # a stranger overwriting a real value: refused too
    with pytest.raises(px.LaunchError, match=INTRUSION):
        store.get("mine")
    with pytest.raises(px.LaunchError, match=INTRUSION):
        store.compare_set("mine", "value", "x")
    assert not (tmp_path / "marker").exists()


def test_a_value_moved_to_another_key_is_refused():
    store = host_store("127.0.0.1", None, timedelta(seconds=10), b"k" * 32)
    raw = store.inner
    store.set("rank_0", b"10.0.0.1")
    raw.set("rank_1", raw.get("rank_0"))  # signed, but for another key
    with pytest.raises(px.LaunchError, match=r"key 'rank_1'"):
        store.get("rank_1")


def test_another_secret_is_a_stranger_too():
    store = host_store("127.0.0.1", None, timedelta(seconds=10), b"k" * 32)
    other = SignedStore(
        dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=10)), b"x" * 32, "here"
    )
    other.set("key", b"value")
    with pytest.raises(px.LaunchError, match=INTRUSION):
        store.get("key")


# -- a local launch -----------------------------------------------------------------------------


def _workers_alive() -> bool:
    helpers = set(zygote.helper_pids())
    return any(child.pid not in helpers for child in psutil.Process().children(recursive=True))


@pytest.mark.timeout(60)
def test_a_stranger_planting_a_rank_address_in_a_local_launch_is_named(monkeypatch):
    """The caller is rank 1 and never writes its address: a stranger writes one for it first.

    Rank 0 reads the planted address as gloo's rendezvous goes; it must refuse it at once.
    """

    def stranger_instead_of_rank_1(backend, store, rank, world_size, timeout):
        assert rank == 1
        stranger = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=10))
        stranger.set("0//cpu//0/1", b"\x00" * 64)  # an "address" for rank 1 (gloo's rendezvous key)
        deadline = time.monotonic() + 30
        while _workers_alive() and time.monotonic() < deadline:  # until rank 0 has ended
            time.sleep(0.01)
        raise RuntimeError("rank 1 stood aside for the stranger")

    monkeypatch.setattr(dist, "init_process_group", stranger_instead_of_rank_1)
    with pytest.raises(px.LaunchError) as info:
        px.launch(px.get_rank, platform=px.Platform(device="cpu", n_procs=2, timeout=30), caller_rank=1)
    assert INTRUSION in str(info.value) and "'0//cpu//0/1'" in str(info.value)


# -- jobs that listen where others reach them: inside a namespace of their own -------------------


@pytest.fixture
def host():
    with one_host("phx-sec") as name:
        yield name


STRANGER = """
import pickle, sys, time
from datetime import timedelta
import torch.distributed as dist

port, wait_for, plant, marker, planted = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]

class Payload:
    def __reduce__(self):
        return (open, (marker, "w"))

store = dist.TCPStore("127.0.0.1", int(port), is_master=False, timeout=timedelta(seconds=60))
if wait_for:
    store.wait([wait_for], timedelta(seconds=60))
for key in plant.split(","):
    store.set(key, pickle.dumps(Payload()))
open(planted, "w").close()
print("planted", plant, flush=True)
"""


def _start(host, tmp_path, name, source, args=(), env=None):
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.Popen(
        ["ip", "netns", "exec", host, sys.executable, str(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
    )


def _stranger(host, tmp_path, wait_for, plant):
    args = (PORT, wait_for, plant, tmp_path / "marker", tmp_path / "planted")
    return _start(host, tmp_path, "stranger", STRANGER, args)


def _finish(process, timeout=90):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


HAND_STARTED = """
import sys, phalanx as px
try:
    print("values", px.launch(px.get_rank, platform=px.Platform(device="cpu", timeout=30)), flush=True)
except px.PhalanxError as error:
    print(f"{type(error).__name__}: {error}", flush=True)
    sys.exit(3)
"""


def _place(rank: int, world_size: int = 2) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(PORT),
        "TORCHELASTIC_RUN_ID": "by-hand",
    }


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_a_stranger_planting_a_rank_address_in_a_joined_rendezvous_is_named(host, tmp_path):
    """Rank 0 started by hand waits for rank 1's address; a stranger writes one before rank 1 exists."""
    rank0 = _start(host, tmp_path, "rank0", HAND_STARTED, env={**_place(0), "PHALANX_JOB_SECRET": SECRET})
    stranger = _stranger(host, tmp_path, "phalanx/1//rank0-is-here", "phalanx/1//0//cpu//0/1")
    assert _finish(stranger)[0] == 0
    code, out, err = _finish(rank0)
    assert code == 3, out + err
    assert f"LaunchError: {INTRUSION} (key 'phalanx/1//0//cpu//0/1')" in out, out + err
    assert not (tmp_path / "marker").exists()


TORCHRUN_JOB = """
import os, sys, time, phalanx as px

def work():
    if px.get_rank() == 1:
        deadline = time.monotonic() + 60
        while not os.path.exists("planted") and time.monotonic() < deadline:
            time.sleep(0.01)
        raise ValueError("rank 1 failed")
    return px.get_rank()

try:
    print("values", px.launch(work, platform=px.Platform(device="cpu", timeout=30)), flush=True)
except px.PhalanxError as error:
    print(f"rank {os.environ['RANK']} {type(error).__name__}: {error}".splitlines()[0], flush=True)
    sys.exit(3)
"""


@pytest.mark.cluster
@pytest.mark.timeout(120)
@pytest.mark.parametrize("secret", [SECRET, None], ids=["with-secret", "plain-torchrun"])
def test_a_forged_failure_record_in_a_torchrun_job_runs_no_code_and_is_named(host, tmp_path, secret):
    """A rank that failed reads the others' failure records: a stranger planted rank 0's as a pickle."""
    torchrun = [
        "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(PORT), "job.py",
    ]  # fmt: skip
    (tmp_path / "job.py").write_text(textwrap.dedent(TORCHRUN_JOB))
    env = {**os.environ, "PHALANX_JOB_SECRET": secret or ""}
    job = subprocess.Popen(
        ["ip", "netns", "exec", host, sys.executable, *torchrun],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    stranger = _stranger(host, tmp_path, "phalanx/1//rank0-is-here", "phalanx/1//failure/0")
    assert _finish(stranger)[0] == 0
    code, out, err = _finish(job)
    assert code != 0
    expected = INTRUSION if secret else "the store holds a failure record this job did not write"
    assert f"rank 1 LaunchError: {expected} (key" in out, out + err
    assert "failure/0" in out
    assert not (tmp_path / "marker").exists()


NODE = """
import os, sys, time, phalanx as px

node, attack = int(sys.argv[1]), sys.argv[2]

def work():
    if attack == "abort":
        time.sleep(60)  # stands for training; the stranger's flag comes long before
    elif px.get_node_rank() == 1:  # node 1 finishes only once node 0 is done: its outcome comes last
        deadline = time.monotonic() + 60
        while not os.path.exists("node0-done") and time.monotonic() < deadline:
            time.sleep(0.01)
    return px.get_rank()

platform = px.Platform(device="cpu", n_procs=1, n_nodes=2, node_rank=node, master_port=29400, timeout=30)
try:
    print("values", px.launch(work, platform=platform), flush=True)
except Exception as error:
    print(f"node {node} {type(error).__name__}: {error}".splitlines()[0], flush=True)
    sys.exit(3)
finally:
    if node == 0:
        open("node0-done", "w").close()
"""


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_a_forged_node_outcome_runs_no_code_and_returns_no_value(host, tmp_path):
    env = {"PHALANX_JOB_SECRET": SECRET}
    node0 = _start(host, tmp_path, "node", NODE, (0, "outcome"), env)
    node1 = _start(host, tmp_path, "node", NODE, (1, "outcome"), env)
    stranger = _stranger(host, tmp_path, "phalanx/nodes/outcome/0", "phalanx/nodes/outcome/1")
    assert _finish(stranger)[0] == 0
    code, out, err = _finish(node0)
    _finish(node1)
    assert code == 3, out + err
    assert f"node 0 LaunchError: {INTRUSION} (key 'phalanx/nodes/outcome/1')" in out, out + err
    assert "values" not in out
    assert not (tmp_path / "marker").exists()


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_a_forged_abort_flag_is_named_on_every_node(host, tmp_path):
    env = {"PHALANX_JOB_SECRET": SECRET}
    nodes = [_start(host, tmp_path, "node", NODE, (node, "abort"), env) for node in (0, 1)]
    # The flag goes up once both nodes' ranks are in the job: rank 1 (node 1) has written its address.
    flag = _start(
        host,
        tmp_path,
        "flag",
        """
        import sys
        from datetime import timedelta
        import torch.distributed as dist
        store = dist.TCPStore("127.0.0.1", 29400, is_master=False, timeout=timedelta(seconds=60))
        store.wait(["0//cpu//0/1"], timedelta(seconds=60))
        store.set("phalanx/nodes/abort", b"1")
        """,
    )
    assert _finish(flag)[0] == 0
    for node, process in enumerate(nodes):
        code, out, err = _finish(process)
        assert code == 3, out + err
        assert f"node {node} LaunchError: {INTRUSION} (key 'phalanx/nodes/abort')" in out, out + err


# -- the secret ---------------------------------------------------------------------------------


def test_several_nodes_without_a_secret_are_refused_with_the_fix(monkeypatch):
    monkeypatch.delenv("PHALANX_JOB_SECRET", raising=False)
    monkeypatch.delenv("PHALANX_JOB_SECRET_FILE", raising=False)
    platform = px.Platform(device="cpu", n_nodes=2, node_rank=1, master_addr="127.0.0.1", master_port=1)
    with pytest.raises(px.LaunchError, match=r"needs a job secret.*phalanx secret.*PHALANX_JOB_SECRET"):
        px.launch(px.get_rank, platform=platform)


def test_phalanx_secret_prints_a_new_secret_each_time():
    first, second = (
        subprocess.run([sys.executable, "-m", "phalanx", "secret"], capture_output=True, text=True, check=True)
        for _ in range(2)
    )
    for result in (first, second):
        assert len(bytes.fromhex(result.stdout.strip())) == 32
    assert first.stdout != second.stdout


@pytest.mark.parametrize(
    ("value", "message"),
    [("xyz", "not a hexadecimal string"), ("abcd", "holds 2 bytes; a job secret needs at least 32")],
)
def test_an_unusable_secret_is_refused(monkeypatch, value, message):
    from phalanx.job_secret import secret_from_environment

    monkeypatch.setenv("PHALANX_JOB_SECRET", value)
    with pytest.raises(px.LaunchError, match=message):
        secret_from_environment()


def test_a_secret_file_is_read_only_when_private_and_yours(monkeypatch, tmp_path):
    import pwd

    from phalanx.job_secret import secret_from_environment

    monkeypatch.delenv("PHALANX_JOB_SECRET", raising=False)
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    monkeypatch.setenv("PHALANX_JOB_SECRET_FILE", str(path))
    path.chmod(0o644)
    with pytest.raises(px.LaunchError, match=r"mode 0644: others can read it.*chmod 600"):
        secret_from_environment()
    path.chmod(0o600)
    assert secret_from_environment() == bytes.fromhex(SECRET)
    os.chown(path, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(px.LaunchError, match=r"is owned by uid \d+, not by you"):
        secret_from_environment()


# -- bounded waits and clear messages for ranks started by others --------------------------------


@pytest.mark.timeout(60)
def test_a_rank_outside_the_world_size_is_refused_at_once():
    result = run_script(HAND_STARTED, env=_place(5), timeout=30)
    assert result.returncode == 3
    assert "rank 5 is outside world size 2 under torchrun (RANK, WORLD_SIZE" in result.stdout, result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variable", ["WORLD_SIZE", "MASTER_PORT"])
def test_a_variable_that_is_not_a_number_is_named(variable):
    result = run_script(HAND_STARTED, env={**_place(0), variable: "abc"}, timeout=30)
    assert result.returncode == 3
    assert f"{variable}='abc' is not a whole number" in result.stdout, result.stdout + result.stderr


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_a_rank_whose_rank_0_never_comes_fails_within_the_connect_timeout(host, tmp_path):
    source = HAND_STARTED.replace("timeout=30)", "timeout=30, connect_timeout=2)")
    rank1 = _start(host, tmp_path, "rank1", source, env=_place(1))
    code, out, err = _finish(rank1, timeout=30)
    assert code == 3, out + err
    assert "could not reach the store at 127.0.0.1:29400 within connect_timeout=0:00:02" in out, out + err
    assert "MASTER_ADDR and MASTER_PORT" in out


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_a_rank_that_reaches_a_store_rank_0_never_greets_fails_within_the_connect_timeout(host, tmp_path):
    squatter = _start(
        host,
        tmp_path,
        "squatter",
        """
        import time
        from datetime import timedelta
        import torch.distributed as dist
        store = dist.TCPStore("127.0.0.1", 29400, is_master=True, timeout=timedelta(seconds=30))
        time.sleep(20)
        """,
    )
    source = HAND_STARTED.replace("timeout=30)", "timeout=30, connect_timeout=3)")
    rank1 = _start(host, tmp_path, "rank1", source, env=_place(1))
    code, out, err = _finish(rank1, timeout=30)
    squatter.kill()
    squatter.communicate()
    assert code == 3, out + err
    assert "rank 0 of this job did not show up there within connect_timeout=0:00:03" in out, out + err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_timeout_that_never_ends_is_refused(value):
    with pytest.raises(px.PlatformError, match=r"finite number of seconds"):
        px.Platform(timeout=value)
    with pytest.raises(px.PlatformError, match=r"connect_timeout=.*finite number of seconds"):
        px.Platform(connect_timeout=value)
