"""phalanx.compat.mpify: ranch, in_torchddp, TorchDDPCtx and import_star as mpify documents them."""

from __future__ import annotations

import os

import pytest
import torch

import phalanx as px
from phalanx.compat.mpify import TorchDDPCtx, global_imports, import_star, in_torchddp, ranch
from tests.conftest import run_script

pytestmark = pytest.mark.timeout(60)


def fn(*args, **kwargs):
    # mpify's own test function: each process reports its place from os.environ.
    import os

    r = int(os.environ["LOCAL_RANK"])
    ws = int(os.environ["LOCAL_WORLD_SIZE"])
    return {"local_rank": r, "local_ws": ws, "pid": os.getpid(), "_args": args, **kwargs}


@pytest.mark.parametrize(("nprocs", "caller_rank"), [(1, None), (2, 0), (2, 1)])
def test_env_setup(nprocs, caller_rank):
    # mpify's test_env_setup (3 processes shrunk to 2), with arguments and keyword arguments.
    args, kwargs = ("arg_1", 20, "arg_3"), {"a": "foo", "c": 100}
    res = ranch(nprocs, fn, *args, caller_rank=caller_rank, gather=True, imports="import os", **kwargs)
    pids = set()
    for i in range(nprocs):
        r = res[i]
        pids.add(r["pid"])
        if caller_rank is not None and i == caller_rank:
            assert r["pid"] == os.getpid()
        assert r["local_rank"] == i
        assert r["local_ws"] == nprocs
        assert r["_args"] == args
        assert (r["a"], r["c"]) == ("foo", 100)
    assert len(pids) == nprocs


def _places() -> tuple[str, ...]:
    return tuple(os.environ[name] for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE"))


def test_ranch_with_caller_rank_zero_returns_every_rank_value_with_its_environment():
    assert ranch(2, _places, caller_rank=0) == [("0", "2", "0", "2"), ("1", "2", "1", "2")]
    assert "LOCAL_RANK" not in os.environ  # the caller's own environment is given back


def test_gather_false_returns_the_callers_value_or_none():
    assert ranch(2, _places, caller_rank=1, gather=False) == ("1", "2", "1", "2")
    assert ranch(2, _places, caller_rank=None, gather=False) is None


def _star_imported() -> float:
    import_star(["math"])
    # `sqrt` comes from the `from math import *` done just above, inside this rank.
    return sqrt(16.0) + int(os.environ["RANK"])  # noqa: F821


def test_import_star_inside_a_rank_brings_the_module_names():
    assert ranch(2, _star_imported, caller_rank=None) == [4.0, 5.0]


def test_import_helpers_fill_the_given_namespace_and_refuse_other_statements():
    namespace: dict = {}
    import_star("json", namespace)
    global_imports(["import math as m", "from os import path, sep as separator"], namespace)
    assert {"dumps", "m", "path", "separator"} <= set(namespace) and "_default_encoder" not in namespace
    with pytest.raises(ValueError, match="not an import statement"):
        global_imports("import os\nos.remove('x')", namespace)


class _Marker:
    """A context manager mpify runs around the call: enter before, exit after, in every rank."""

    def __init__(self, folder):
        self.folder = folder

    def __enter__(self):
        os.environ["MARKER"] = "inside"
        return self

    def __exit__(self, *exc_info):
        (self.folder / f"left-{os.environ['RANK']}").write_text(os.environ.pop("MARKER"))


def _marker() -> str:
    return os.environ["MARKER"]


def test_ctx_is_entered_around_the_call_in_every_rank(tmp_path):
    assert ranch(2, _marker, ctx=_Marker(tmp_path)) == ["inside", "inside"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["left-0", "left-1"]


def _fail_on_one() -> int:
    if os.environ["RANK"] == "1":
        raise ZeroDivisionError("rank one divides by zero")
    return 42


def test_a_failing_rank_raises_worker_error_where_mpify_returned_none():
    with pytest.raises(px.WorkerError, match="rank one divides by zero") as caught:
        ranch(2, _fail_on_one, caller_rank=None, gather=False)
    assert caught.value.rank == 1


def run_allreduce(rank, size):
    # mpify's test_torch_ddp target: an all-reduce over the group in_torchddp set up.
    tensor = torch.tensor(rank)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.item()


def rank_size_wrapper(fn):
    def new_fn(*args, **kwargs):
        import os

        return fn(int(os.environ.get("RANK")), int(os.environ.get("WORLD_SIZE")), *args, **kwargs)

    return new_fn


def test_torch_ddp():
    # mpify's test_torch_ddp, 5 processes shrunk to 2.
    nprocs = 2
    fn = rank_size_wrapper(run_allreduce)
    t = in_torchddp(nprocs, fn, use_gpu=False)
    assert t == sum(range(nprocs))


def test_torchddpctx_maps_hosts_and_gpus_onto_a_platform():
    second_host = TorchDDPCtx(world_size=4, base_rank=2, use_gpu=False, addr="10.0.0.1", port=29555).platform(2)
    assert (second_host.n_nodes, second_host.node_rank, second_host.n_procs) == (2, 1, 2)
    assert (second_host.master_addr, second_host.master_port, second_host.device) == ("10.0.0.1", 29555, "cpu")
    gpu = TorchDDPCtx(use_gpu=True).platform(1)
    assert gpu.device == ("cuda" if torch.cuda.is_available() else "cpu")  # mpify falls back to CPU too
    with pytest.raises(px.PlatformError, match="base_rank"):
        TorchDDPCtx(world_size=4, base_rank=1).platform(2)


def test_torchddpctx_outside_ranch_raises_a_clear_error(monkeypatch):
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(px.PhalanxError, match="LOCAL_RANK and LOCAL_WORLD_SIZE"), TorchDDPCtx(world_size=1):
        pass


def test_imports_and_need_bring_main_objects_into_the_ranks():
    # mpify's notebook case: names of __main__ travel by `need`, modules by `imports`.
    result = run_script(
        """
        from phalanx.compat.mpify import ranch

        SCALE = 10

        def scaled():
            # globals()[...]: a name the function does not mention, so only `need` can bring it.
            return json.dumps(globals()["SCALE"] * int(os.environ["RANK"]) + floor(0.5))

        print(ranch(2, scaled, imports="import os, json\\nfrom math import *", need="SCALE"))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "['0', '10']" in result.stdout
