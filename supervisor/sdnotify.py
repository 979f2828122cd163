"""Minimal systemd notification client (sd_notify(3)) for the supervisor.

The unit runs with ``Type=notify`` and ``NotifyAccess=main``: only the master
reports READY=1 (once workers serve), RELOADING=1/READY=1 around a reload and
STOPPING=1. Nothing here raises: a missing or broken notify socket must never
take the proxy down, so every failure is logged at DEBUG and reported as
``False``.

gunicorn's Arbiter sends its own ``READY=1`` from the master as soon as it has
bound, before any worker exists, by reading ``$NOTIFY_SOCKET`` itself. With
``NotifyAccess=main`` systemd would accept that premature message, so the
master should call :func:`claim_socket` before starting the Arbiter: it moves
the address out of the environment (gunicorn and the workers then see
nothing) while :func:`notify` keeps using it.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = [
    "claim_socket",
    "mainpid",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
]

logger = logging.getLogger("fluxgate.sdnotify")

_ENV = "NOTIFY_SOCKET"
# Address taken out of the environment by claim_socket(); None = read the env.
_claimed: str | None = None


def claim_socket() -> str | None:
    """Remove ``$NOTIFY_SOCKET`` from the environment and keep it for :func:`notify`.

    Returns the address, or None when not started by systemd.
    """
    global _claimed
    address = os.environ.pop(_ENV, None)
    if address:
        _claimed = address
    return _claimed


def _socket_address() -> str | bytes | None:
    raw = _claimed if _claimed is not None else os.environ.get(_ENV)
    if not raw:
        return None
    if raw.startswith("@"):
        # Abstract namespace: systemd writes '@', the kernel wants a NUL byte.
        return b"\0" + os.fsencode(raw[1:])
    if raw.startswith("/"):
        return raw
    # vsock:CID:PORT (systemd >= 254, for VMs) is not needed on a host service.
    logger.debug("unsupported %s address %r", _ENV, raw)
    return None


def notify(state: str) -> bool:
    """Send one notification datagram; True if it was handed to the socket."""
    try:
        address = _socket_address()
        if address is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except Exception as exc:
        logger.debug("sd_notify %r failed: %s", state, exc)
        return False
    return True


def ready() -> bool:
    return notify("READY=1")


def reloading() -> bool:
    # systemd >= 253 (Type=notify-reload) requires MONOTONIC_USEC with
    # RELOADING=1 to tell this reload from a stale one; older versions and
    # Type=notify ignore the extra field.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    one_line = " ".join(text.splitlines())
    return notify(f"STATUS={one_line}")


def mainpid(pid: int) -> bool:
    return notify(f"MAINPID={int(pid)}")
