"""Several nodes without a scheduler: two hosts made with network namespaces run one 4-rank job.

Each host is a network namespace with one end of a veth pair (10.213.0.1 and 10.213.0.2);
every process of the test runs inside one of them (`ip netns exec`), and the addresses are
used nowhere else.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest

import phalanx as px
from tests.namespaces import ip, remove_host, require_namespaces

pytestmark = [pytest.mark.timeout(120), pytest.mark.cluster]
SECRET = "ab" * 32  # every node of a job is given the same secret

NODE = """
import os, sys, phalanx as px

node, address = int(sys.argv[1]), sys.argv[2]

def work():
    if os.environ.get("FAIL_RANK") == str(px.get_rank()):
        raise ValueError(f"rank {px.get_rank()} failed on node {px.get_node_rank()}")
    return px.get_rank(), px.get_node_rank(), px.all_reduce(px.get_rank(), op="sum")

platform = px.Platform(device="cpu", n_procs=2, n_nodes=2, node_rank=node, master_addr=address, master_port=29400)
try:
    print("values", px.launch(work, platform=platform), flush=True)
except px.WorkerError as error:
    print(f"WorkerError rank={error.rank} type={error.exc_type}", flush=True)
    sys.exit(3)
"""


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair; everything in them is killed afterwards."""
    require_namespaces()
    tag = uuid.uuid4().hex[:6]
    hosts = [f"phx-{tag}-a", f"phx-{tag}-b"]
    ends = [f"phx{tag}a", f"phx{tag}b"]
    addresses = ["10.213.0.1", "10.213.0.2"]
    try:
        for host in hosts:
            ip("netns", "add", host)
        ip("link", "add", ends[0], "netns", hosts[0], "type", "veth", "peer", "name", ends[1], "netns", hosts[1])
        for host, end, address in zip(hosts, ends, addresses, strict=True):
            ip("-n", host, "addr", "add", f"{address}/24", "dev", end)
            ip("-n", host, "link", "set", "lo", "up")
            ip("-n", host, "link", "set", end, "up")
    except subprocess.CalledProcessError as error:
        for host in hosts:
            remove_host(host)
        pytest.skip(f"cannot make network namespaces here: {error.stderr.strip()}")
    yield hosts, addresses
    for host in hosts:
        remove_host(host)


def _run_nodes(hosts, addresses, tmp_path, env=None):
    script = tmp_path / "node.py"
    script.write_text(textwrap.dedent(NODE))
    nodes = [
        subprocess.Popen(
            ["ip", "netns", "exec", host, sys.executable, str(script), str(node), addresses[0]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PHALANX_JOB_SECRET": SECRET, **(env or {})},
        )
        for node, host in enumerate(hosts)
    ]
    return [(node.wait(timeout=90), *node.communicate()) for node in nodes]


def test_two_hosts_run_one_four_rank_job_and_both_get_every_value(two_hosts, tmp_path):
    hosts, addresses = two_hosts
    for code, out, err in _run_nodes(hosts, addresses, tmp_path):
        assert code == 0, err
        assert "values [(0, 0, 6), (1, 0, 6), (2, 1, 6), (3, 1, 6)]" in out


def test_a_failure_on_one_host_stops_both_and_both_name_it(two_hosts, tmp_path):
    hosts, addresses = two_hosts
    for code, out, err in _run_nodes(hosts, addresses, tmp_path, env={"FAIL_RANK": "3"}):
        assert code == 3, err
        assert "WorkerError rank=3 type=ValueError" in out


def test_several_nodes_need_a_master_port():
    with pytest.raises(px.PlatformError, match=r"master_port.*node 0"):
        px.Platform(device="cpu", n_nodes=2, node_rank=1, master_addr="10.213.0.1")
