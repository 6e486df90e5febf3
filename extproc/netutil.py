"""Small networking helpers: free ports and ``host:port`` parsing."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

__all__ = ["HostPort", "free_port", "free_ports", "parse_host_port", "parse_host_ports", "is_ip_literal"]


@dataclass(frozen=True, slots=True)
class HostPort:
    """A ``host:port`` pair. ``host`` is an IP literal (v4 or v6, no brackets) or a DNS name."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_host_port(value: str, *, default_host: str | None = None) -> HostPort:
    """Parse ``host:port``, ``[v6]:port`` or (with ``default_host``) ``:port`` / ``port``.

    Raises ``ValueError`` with a readable message on anything else.
    """
    text = value.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"bad address {value!r}: expected [v6-address]:port")
        host, port_text = text[1:end], text[end + 2 :]
        if not is_ip_literal(host):
            raise ValueError(f"bad address {value!r}: {host!r} is not an IPv6 address")
    elif text.count(":") == 1:
        host, port_text = text.split(":", 1)
    elif text.isdigit() and default_host is not None:
        host, port_text = "", text
    else:
        raise ValueError(f"bad address {value!r}: expected host:port")
    if not host:
        if default_host is None:
            raise ValueError(f"bad address {value!r}: missing host")
        host = default_host
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad address {value!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"bad address {value!r}: port {port} out of range")
    return HostPort(host, port)


def parse_host_ports(value: str | list[str] | tuple[str, ...] | None) -> tuple[HostPort, ...]:
    """Parse a comma-separated list (or a list of such strings) of ``host:port``."""
    if not value:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    out: list[HostPort] = []
    for item in items:
        for part in item.split(","):
            if part.strip():
                out.append(parse_host_port(part))
    return tuple(out)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0 and release it).

    Prefer letting the server bind port 0 itself where it can; this is for programs that
    must be told a port up front. The one free-port helper of the project (see :func:`free_ports`).
    """
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago (all held open together, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
