"""A tiny sd_notify client: tell systemd we are ready, stopping, alive, and what we are doing.

Implements the datagram protocol of ``sd_notify(3)`` without a dependency: one ``AF_UNIX``
``SOCK_DGRAM`` datagram of newline-separated ``KEY=VALUE`` assignments, sent to the socket named by
``$NOTIFY_SOCKET`` (a file-system path, or an abstract socket when it starts with ``@``).

Every function takes an ``environ`` mapping. Library code passes the mapping it was given; only when
``environ`` is ``None`` does this module fall back to ``os.environ`` (the process environment that
systemd set up), which is the one place the package reads the environment outside
:func:`coordinator.config.load_settings`.

Guarantees: a function never raises because of the notification socket. Without ``$NOTIFY_SOCKET``
(not under systemd, or ``Type=simple``) it is a no-op returning ``False``; a send that fails is
logged at WARNING and returns ``False``, because a lost status line must not bring the daemon down
(a lost watchdog ping is handled by systemd itself: it restarts us). Not guaranteed: that systemd
accepts the message (``NotifyAccess=main`` drops datagrams from any process but the main one, so
agent processes the daemon starts should not inherit :data:`NOTIFY_VARIABLES`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
#: The variables systemd sets for the main process only; strip them from a child's environment.
NOTIFY_VARIABLES: tuple[str, ...] = (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID)

# A full receive queue blocks a datagram send; systemd drains quickly, so waiting longer than this
# means it is wedged and blocking the daemon's loop would only make things worse.
_SEND_TIMEOUT = 1.0


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    # The one documented fallback to the process environment (see the module docstring).
    return os.environ if environ is None else environ


def _address(value: str) -> bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into a socket address, or ``None`` when it is not one we support."""
    if value.startswith("@"):
        # Abstract namespace (Linux): the name is everything after '@', behind a NUL byte.
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None  # relative paths are invalid per sd_notify(3); vsock: is not supported here


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``"KEY=VALUE"`` lines) to systemd's notification socket.

    Returns ``True`` when the datagram was sent, ``False`` when ``$NOTIFY_SOCKET`` is unset, empty
    or unsupported, or when sending failed (logged). Raises ``ValueError`` only for an empty
    ``state``, which is a programming error. ``environ`` defaults to ``os.environ``.
    """
    if not state:
        raise ValueError("sd_notify state must not be empty")
    value = _environ(environ).get(NOTIFY_SOCKET, "")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("ignoring unsupported NOTIFY_SOCKET=%r", value)
        return False
    try:
        # Python sockets are close-on-exec by default (PEP 446): agents never inherit this one.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", value, exc)
        return False
    return True


def ready(environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd start-up is complete (``READY=1``): ``Type=notify`` units become active."""
    return notify("READY=1", environ)


def stopping(environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd a graceful shutdown has begun (``STOPPING=1``)."""
    return notify("STOPPING=1", environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """Set the one-line status ``systemctl status`` shows (``STATUS=...``).

    Line breaks would start a new assignment in the protocol, so they are replaced by spaces.
    """
    line = " ".join(text.splitlines())
    return notify(f"STATUS={line}", environ)


def watchdog_ping(environ: Mapping[str, str] | None = None) -> bool:
    """Reset the service watchdog timer (``WATCHDOG=1``); call every :func:`watchdog_interval`."""
    return notify("WATCHDOG=1", environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC`` (as sd_watchdog_enabled(3) says).

    Returns ``None`` when the watchdog is off for this process: ``$WATCHDOG_USEC`` unset, not a
    positive integer, or ``$WATCHDOG_PID`` set to a pid other than ours (the variables were
    inherited from a parent that systemd supervises, not meant for us). ``environ`` defaults to
    ``os.environ``.
    """
    env = _environ(environ)
    raw_usec = env.get(WATCHDOG_USEC, "")
    if not raw_usec:
        return None
    raw_pid = env.get(WATCHDOG_PID, "")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            log.warning("ignoring the watchdog: invalid WATCHDOG_PID=%r", raw_pid)
            return None
        if pid != os.getpid():
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("ignoring the watchdog: invalid WATCHDOG_USEC=%r", raw_usec)
        return None
    return usec / 2 / 1_000_000
