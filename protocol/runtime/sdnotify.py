"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

What the agents send, in order (the units are ``Type=notify``, ``WatchdogSec=30``):
``STATUS=starting ...`` before the agent runs; ``READY=1`` once every listener, control
socket and mount is up; ``WATCHDOG=1`` every half watchdog period while it runs (only
when systemd set ``WATCHDOG_USEC`` for this process); ``STOPPING=1`` on SIGTERM;
``STATUS=...`` when it stopped, failed or the config was invalid. On SIGHUP
(``ExecReload=``): ``RELOADING=1`` with ``MONOTONIC_USEC`` (:func:`notify_reloading`)
while the config is read again, then ``READY=1`` with a ``STATUS=`` saying how it went.
"""

from __future__ import annotations

import os
import socket
import time


def notify(state: str, status: str | None = None) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd, with ``STATUS=status`` when given.

    Returns False when not under systemd (no $NOTIFY_SOCKET) or the socket refused
    the datagram; never raises and never blocks.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = state if status is None else f"{state}\nSTATUS={status}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.setblocking(False)
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def notify_reloading(status: str | None = None) -> bool:
    """Tell systemd a reload began: ``RELOADING=1`` and the ``MONOTONIC_USEC`` it
    asks to come with it (sd_notify(3)); ``READY=1`` must follow when it is over."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", status)


def watchdog_interval() -> float | None:
    """Half the watchdog period systemd asked for, in seconds, or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        interval = int(usec) / 2_000_000
    except ValueError:
        return None
    return interval if interval > 0 else None
