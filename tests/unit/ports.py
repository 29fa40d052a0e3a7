"""Loopback TCP ports for the servers the tests start on a port they name: the one helper for it."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 10000
_RANDOM = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. A port the kernel picks (a bind to port 0) lies in
    that range, and the kernel may hand it out again (to another test's port-0 server, or as the local end of an
    outgoing connection) in the seconds before the process it was meant for binds it: a runtime imports torch first.
    Seen in CI (2026-12-04): a runtime test's readiness poll got another server's binary reply. Below the range a
    port is only ever taken by name, and two test processes picking at random rarely pick the same one."""
    low = _ephemeral_low()
    if low - _LOWEST >= 1000:
        for _attempt in range(200):
            port = _RANDOM.randrange(_LOWEST, low)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    with socket.socket() as sock:  # no room below the range: the kernel's choice
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
