"""Checks that the server can bind its address before the (slow) engine load."""

from __future__ import annotations

import socket

from kiln.errors import KilnError


def check_port_free(host: str, port: int) -> None:
    """Bind and release host:port the way uvicorn will; a KilnError naming --port/--host if that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise KilnError(f"--host {host!r} cannot be resolved: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise KilnError(
                f"cannot listen on {host}:{port} ({exc.strerror}): another process may be using it; "
                "choose another --port (or --host)"
            ) from exc
