"""Where ranks meet: a `TCPStore` hosted by the caller, with no port race.

The caller binds a listening socket itself (port 0 means the kernel picks a free port
atomically) and hands it to the store, so that the store listens only on the rendezvous
address (loopback by default) and no other program can take the port between the choice and
the use. Ranks connect to it as clients and pass it to `init_process_group(store=...)`.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from datetime import timedelta

import torch.distributed as dist

from phalanx.errors import LaunchError
from phalanx.name_lookups import without_reverse_lookups

__all__ = ["StoreListener", "connect_store", "host_store"]


def _listening_socket(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(1024)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise LaunchError(
                f"master_port={port} on {addr} is already in use by another program. "
                "Leave master_port unset to let phalanx pick a free port, or choose another one."
            ) from error
        raise LaunchError(
            f"cannot listen on master_addr={addr!r} port {port}: {error}. "
            "Use an address of this machine (the default is 127.0.0.1)."
        ) from error
    return sock


class StoreListener:
    """The store's listening socket, bound before the store starts: its port is known at once.

    Ranks may connect as soon as it exists; they wait in its backlog until `host` starts the
    store on it, so a launch can start its workers and the store at the same time.
    """

    def __init__(self, addr: str, port: int | None) -> None:
        self.addr = addr
        self._socket = _listening_socket(addr, port or 0)
        self.port: int = self._socket.getsockname()[1]

    def host(self, timeout: timedelta) -> dist.TCPStore:
        """Start the store on the socket, which it owns from then on (and closes when destroyed)."""
        try:
            with without_reverse_lookups(self.addr):  # the store connects a client of its own
                store = dist.TCPStore(
                    self.addr,
                    self.port,
                    is_master=True,
                    timeout=timeout,
                    wait_for_workers=False,
                    master_listen_fd=self._socket.fileno(),
                )
        except BaseException:
            self._socket.close()
            raise
        self._socket.detach()
        return store

    def close(self) -> None:
        """Free the port without starting a store (a no-op once `host` succeeded)."""
        self._socket.close()


def host_store(addr: str, port: int | None, timeout: timedelta) -> dist.TCPStore:
    """Start the job's store in this process, listening on `addr` only; port None picks a free one."""
    return StoreListener(addr, port).host(timeout)


def connect_store(addr: str, port: int, timeout: timedelta) -> dist.TCPStore:
    """Join a store that another process hosts."""
    with without_reverse_lookups(addr):
        return dist.TCPStore(addr, port, is_master=False, timeout=timeout)


def _address_of_interface(name: str) -> str | None:
    """The IPv4 address of a network interface (Linux SIOCGIFADDR), or None."""
    import fcntl
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            answer = fcntl.ioctl(probe.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(answer[20:24])


def _numeric_address(address: str) -> str:
    """`address` itself if it is an IPv4 address, else the one it resolves to."""
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        return socket.gethostbyname(address)
    return address


def interface_towards(address: str) -> str | None:
    """The name of the local network interface that routes to `address`, or None.

    gloo picks its interface by resolving the host name. Many machines map that name to
    127.0.0.1, and ranks on other hosts then cannot reach it; on others it resolves (through
    DNS, in every rank) to an address that other hosts can reach, and a job that never leaves
    this machine then listens on the network. The interface that routes to the rendezvous
    address is the one the other ranks reach: loopback for a job on one machine. (A UDP
    connect sends nothing.)
    """
    if not hasattr(socket, "if_nameindex"):
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((_numeric_address(address), 9))
            local = probe.getsockname()[0]
    except OSError:
        return None
    for _, name in socket.if_nameindex():
        try:
            if _address_of_interface(name) == local:
                return name
        except (ImportError, OSError):
            return None
    return None
