"""systemd's notify protocol with a plain datagram socket (no libsystemd, no dependency).

``notify("READY=1")`` sends one datagram to ``$NOTIFY_SOCKET``: a filesystem path, or an
abstract-namespace name written with a leading ``@``. Outside systemd (no variable) it does
nothing and returns False; a failure to send is never fatal to the service.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

NOTIFY_ENV = "NOTIFY_SOCKET"


def notify_address(env: Mapping[str, str] | None = None) -> str | bytes | None:
    """The address ``$NOTIFY_SOCKET`` names (bytes with a NUL first for abstract), or None."""
    value = (env if env is not None else os.environ).get(NOTIFY_ENV, "")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other forms are not used by this service


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``). Returns whether it was sent."""
    address = notify_address(env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode("utf-8", "replace"))
    except OSError:
        return False
    return True


def ready(status: str = "") -> bool:
    """READY=1 (and STATUS=)."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def stopping(status: str = "") -> bool:
    """STOPPING=1 (and STATUS=)."""
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    """STATUS=text."""
    return notify(f"STATUS={text}")


__all__ = ["NOTIFY_ENV", "notify", "notify_address", "ready", "status", "stopping"]
