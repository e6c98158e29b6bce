"""A job on one machine asks no DNS server anything, and listens on loopback only.

Each test runs its script on a host of its own (a network namespace) whose name service is the
test's: `/etc/resolv.conf` names a DNS server that the test runs inside the namespace, which
writes down every query and answers that the name does not exist, and `/etc/hosts` maps this
machine's host name to the namespace's own network address, as DNS does on many clusters.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import uuid

import pytest

from tests.namespaces import ETC_NETNS, ip, remove_host, require_namespaces

pytestmark = [pytest.mark.timeout(90), pytest.mark.cluster]

NETWORK_ADDRESS = "10.213.9.1"

# Answers every query at once with "no such name" (NXDOMAIN) and writes the queried name down.
DNS_SERVER = """
import socket, sys

log = open(sys.argv[1], "a", buffering=1)
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("127.0.0.1", 53))
print("ready", flush=True)
while True:
    query, client = server.recvfrom(512)
    end, labels = 12, []
    while query[end]:
        labels.append(query[end + 1 : end + 1 + query[end]].decode())
        end += query[end] + 1
    log.write(".".join(labels) + "\\n")
    question = query[12 : end + 5]
    server.sendto(query[:2] + b"\\x81\\x83" + query[4:6] + bytes(6) + question, client)
"""


@pytest.fixture
def host(tmp_path):
    """A namespace with loopback, a network address, and the test's DNS server; yields a runner."""
    require_namespaces()
    name = f"phx-dns-{uuid.uuid4().hex[:6]}"
    ends = [f"phd{name[-6:]}a", f"phd{name[-6:]}b"]
    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
        ip("-n", name, "addr", "add", f"{NETWORK_ADDRESS}/24", "dev", ends[0])
        for link in ("lo", *ends):
            ip("-n", name, "link", "set", link, "up")
    except subprocess.CalledProcessError as error:
        remove_host(name)
        pytest.skip(f"cannot make a network namespace here: {error.stderr.strip()}")
    etc = ETC_NETNS / name
    etc.mkdir(parents=True)
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:1\n")
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n{NETWORK_ADDRESS} {socket.gethostname()}\n")
    queries = tmp_path / "queries"
    queries.touch()
    server = subprocess.Popen(
        ["ip", "netns", "exec", name, sys.executable, "-c", DNS_SERVER, str(queries)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "ready"

        def run(source: str) -> tuple[str, list[str]]:
            """Run Python source on the host; its output and the names it asked the DNS server for."""
            before = len(queries.read_text().splitlines())
            done = subprocess.run(
                ["ip", "netns", "exec", name, sys.executable, "-c", textwrap.dedent(source)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout, queries.read_text().splitlines()[before:]

        yield run
    finally:
        server.kill()
        server.wait()
        remove_host(name)


def test_a_launch_on_loopback_asks_the_dns_server_nothing(host):
    output, asked = host(
        """
        import socket, torch, torch.distributed as dist, phalanx as px

        def work():
            value = torch.ones(1)
            dist.all_reduce(value)
            return value.item()

        print("values", px.launch(work, platform=px.Platform(device="cpu", n_procs=2)), flush=True)
        print("after", socket.getnameinfo(("::ffff:127.0.0.1", 0, 0, 0), 0), flush=True)
        """
    )
    assert "values [2.0, 2.0]" in output
    # The lookup the script made itself, after the launch, is the only query: the server is
    # reached (the test can see a query), and the system's order is back once the launch is over.
    assert asked == ["1.0.0.127.in-addr.arpa"]


def test_reverse_lookups_go_on_as_before_while_another_thread_runs(host):
    output, asked = host(
        """
        import socket, threading
        from phalanx.name_lookups import without_reverse_lookups

        def reverse():
            return socket.getnameinfo(("::ffff:127.0.0.1", 0, 0, 0), 0)[0]

        with without_reverse_lookups("127.0.0.1"):
            print("alone", reverse(), flush=True)
        stop = threading.Event()
        other = threading.Thread(target=stop.wait)
        other.start()
        with without_reverse_lookups("127.0.0.1"):  # another thread might look a name up now
            print("beside a thread", reverse(), flush=True)
        stop.set()
        other.join()
        """
    )
    assert "alone ::ffff:127.0.0.1" in output
    assert "beside a thread ::ffff:127.0.0.1" in output
    assert asked == ["1.0.0.127.in-addr.arpa"]  # from the second lookup alone


def test_ranks_listen_on_loopback_even_where_the_host_name_resolves_to_the_network(host):
    output, _ = host(
        f"""
        import os, socket, psutil, torch, torch.distributed as dist, phalanx as px

        assert socket.gethostbyname(socket.gethostname()) == "{NETWORK_ADDRESS}"

        def listening():
            value = torch.ones(1)
            dist.all_reduce(value)  # the group is connected: every socket it listens on exists
            mine = psutil.Process().net_connections()
            return sorted({{c.laddr.ip for c in mine if c.status == psutil.CONN_LISTEN}})

        print("listening", px.launch(listening, platform=px.Platform(device="cpu", n_procs=2)), flush=True)
        """
    )
    assert "listening [['127.0.0.1'], ['127.0.0.1']]" in output
