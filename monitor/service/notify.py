"""Minimal sd_notify: READY=1 after start-up, WATCHDOG=1 from the worker loop.

No dependency: a datagram to ``$NOTIFY_SOCKET`` (absent outside systemd,
where this does nothing).
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` to systemd; False when not running under a notify unit."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)  # a receiver that stops reading must never block the worker loop
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:  # includes BlockingIOError: a full receive queue drops the message
        return False
