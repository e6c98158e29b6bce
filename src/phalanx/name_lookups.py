"""Store connections without a reverse DNS lookup each.

c10d names every socket it connects, for its log messages, with `getnameinfo()`. The address
it connects through is the v4-mapped `::ffff:127.0.0.1`, which no `/etc/hosts` lists, so every
store connection (the caller's own and one per rank) sends a PTR query to the DNS server,
even for a job that never leaves loopback. Where that server is remote, a lost reply stalls
the connection for the C library's 5 s timeout: 19 of 1000 lookups on this project's machine,
and so about one launch in thirty at 2 ranks (torch issue #159007 reports the same from
clusters).

While phalanx connects to a store at a numeric address, host lookups in the process go to
`/etc/hosts` alone (glibc's `__nss_configure_lookup`), and back to the system's order right
after: the reverse lookup then ends at once, and c10d prints the numeric address. Nothing
about the connection needs a name: the address is already numeric. The change is made only
while no other Python thread runs, so no other code of the process can see it; elsewhere (a
C library without that function, no `hosts:` line in `/etc/nsswitch.conf`, a host name for
an address) the lookup goes on as before. glibc treats the order put back as one the
program chose: the process no longer rereads nsswitch.conf's `hosts:` line if it changes
later, and no longer asks nscd for host names (it still resolves them in the same order).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ipaddress
import sys
import threading
from collections.abc import Callable, Iterator

__all__ = ["without_reverse_lookups"]

_NSSWITCH = "/etc/nsswitch.conf"


@functools.cache
def _hosts_services(path: str = _NSSWITCH) -> str | None:
    """The `hosts:` line of nsswitch.conf (what the C library uses now), or None.

    Read once per process: once the order has been set by this module, glibc no longer rereads
    the file either, so the line read first stays the order to put back.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as config:
            lines = config.read().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, services = line.split("#", 1)[0].partition(":")
        if name.strip() == "hosts" and services.strip():
            return " ".join(services.split())
    return None


@functools.cache
def _configure_lookup() -> Callable[[bytes, bytes], int] | None:
    """glibc's `__nss_configure_lookup(database, services)`, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), "__nss_configure_lookup")
    except (OSError, AttributeError):  # musl and other C libraries
        return None
    function.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    function.restype = ctypes.c_int
    return function


def _is_numeric(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def without_reverse_lookups(address: str) -> Iterator[None]:
    """Within: host lookups of this process read /etc/hosts only, if that is safe to do here."""
    configure = _configure_lookup()
    services = _hosts_services() if configure is not None else None
    if services is None or not _is_numeric(address) or threading.active_count() != 1:
        yield
        return
    if configure(b"hosts", b"files") != 0:
        yield
        return
    try:
        yield
    finally:
        configure(b"hosts", services.encode())
