"""Where ranks meet: a `TCPStore` hosted by the caller, with no port race, every value signed.

The caller binds a listening socket itself (port 0 means the kernel picks a free port
atomically) and hands it to the store, so that the store listens only on the rendezvous
address (loopback by default) and no other program can take the port between the choice and
the use. Ranks connect to it as clients and pass it to `init_process_group(store=...)`.

torch's TCPStore lets anyone who can reach its port read and write every key. So the job's
store is wrapped in a `SignedStore`: every value written through it carries an HMAC-SHA256 of
its key and bytes under the job secret, and every value read is checked before anyone looks
at it. Given to `init_process_group` as well, it signs gloo's and NCCL's own rendezvous keys:
a stranger can neither plant a rank address nor forge a value; what it writes is refused with
a `LaunchError` naming the key.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Sequence
from datetime import timedelta

import torch.distributed as dist

from phalanx.errors import LaunchError
from phalanx.name_lookups import without_reverse_lookups

__all__ = ["SignedStore", "StoreListener", "connect_store", "host_store", "sign_store"]

_MAC_BYTES = hashlib.sha256().digest_size


class SignedStore(dist.Store):
    """A store whose values are signed with the job secret on write and checked on read.

    A value is stored as HMAC-SHA256(secret, key length, key, value) followed by the value, so
    that a value cannot be forged, nor moved to another key. Counters (`add`) are arithmetic
    on the server and cannot carry a signature: a stranger can change one at most, which can
    only stall a barrier until its timeout, never forge data.
    """

    def __init__(self, inner: dist.Store, secret: bytes, where: str) -> None:
        super().__init__()
        self.inner = inner
        self._secret = secret
        self.where = where  # "host:port", for the error that names the intrusion

    def _signature(self, key: str, value: bytes) -> bytes:
        encoded = key.encode()
        return hmac.new(self._secret, len(encoded).to_bytes(4, "big") + encoded + value, hashlib.sha256).digest()

    def _signed(self, key: str, value: str | bytes) -> bytes:
        data = value.encode() if isinstance(value, str) else bytes(value)
        return self._signature(key, data) + data

    def _checked(self, key: str, raw: bytes) -> bytes:
        mac, value = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
        if len(mac) < _MAC_BYTES or not hmac.compare_digest(mac, self._signature(key, value)):
            raise LaunchError(
                f"the store holds a value this job did not write (key {key!r}): another program is connected to "
                f"MASTER_ADDR:MASTER_PORT ({self.where}), or a process of this job was given another job secret. "
                "Nothing of it was used. Give every process the same PHALANX_JOB_SECRET, keep it to the job's "
                "own processes, and run the job on a port no one else uses."
            )
        return value

    def set(self, key: str, value: str | bytes) -> None:
        self.inner.set(key, self._signed(key, value))

    def get(self, key: str) -> bytes:
        return self._checked(key, self.inner.get(key))

    def multi_set(self, keys: Sequence[str], values: Sequence[str | bytes]) -> None:
        self.inner.multi_set(list(keys), [self._signed(key, value) for key, value in zip(keys, values, strict=True)])

    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        return [self._checked(key, raw) for key, raw in zip(keys, self.inner.multi_get(list(keys)), strict=True)]

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        expected_raw = self._signed(key, expected) if expected else b""
        return self._checked(key, self.inner.compare_set(key, expected_raw, self._signed(key, desired)))

    def add(self, key: str, amount: int) -> int:
        return self.inner.add(key, amount)

    def wait(self, keys: Sequence[str], timeout: timedelta | None = None) -> None:
        if timeout is None:
            self.inner.wait(list(keys))
        else:
            self.inner.wait(list(keys), timeout)

    def check(self, keys: Sequence[str]) -> bool:
        return self.inner.check(list(keys))

    def delete_key(self, key: str) -> bool:
        return self.inner.delete_key(key)

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def set_timeout(self, timeout: timedelta) -> None:
        self.inner.set_timeout(timeout)

    @property
    def port(self) -> int:
        return self.inner.port


def sign_store(store: dist.Store, secret: bytes | None, where: str) -> dist.Store:
    """`store` behind a `SignedStore` when the job has a secret; as it is otherwise (plain torchrun)."""
    return store if secret is None else SignedStore(store, secret, where)


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

    def host(self, timeout: timedelta, secret: bytes | None) -> dist.Store:
        """Start the store on the socket, which it owns from then on (and closes when destroyed).

        Returns it signed with `secret` (see `sign_store`).
        """
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
        return sign_store(store, secret, f"{self.addr}:{self.port}")

    def close(self) -> None:
        """Free the port without starting a store (a no-op once `host` succeeded)."""
        self._socket.close()


def host_store(addr: str, port: int | None, timeout: timedelta, secret: bytes | None) -> dist.Store:
    """Start the job's store in this process, listening on `addr` only; port None picks a free one."""
    return StoreListener(addr, port).host(timeout, secret)


def connect_store(
    addr: str, port: int, timeout: timedelta, secret: bytes | None, connect_timeout: timedelta | None = None
) -> dist.Store:
    """Join a store that another process hosts, signed with `secret`.

    Connecting is retried for `connect_timeout` (default: `timeout`); the store's operations
    then wait up to `timeout`, the collective timeout.
    """
    with without_reverse_lookups(addr):
        store = dist.TCPStore(addr, port, is_master=False, timeout=connect_timeout or timeout)
    if connect_timeout is not None and connect_timeout != timeout:
        store.set_timeout(timeout)
    return sign_store(store, secret, f"{addr}:{port}")


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
