"""The daemon lock: one daemon per spool, and the proof of whether it is alive."""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.errors import AlreadyRunning
from coordinator.proc import process_alive, process_start_time


class DaemonLock:
    """Held (flock) for the daemon's whole life; the kernel drops it if the daemon dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, info: dict[str, Any]) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            other = read_daemon_info(self.path)
            raise AlreadyRunning(
                f"another daemon (pid {other.get('pid', '?')}) already runs on this spool"
            ) from exc
        pid = os.getpid()
        data = json.dumps(
            {"pid": pid, "create_time": process_start_time(pid), "started_at": time.time(), **info}
        ).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def read_daemon_info(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes() or b"{}")
    except (FileNotFoundError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class DaemonProbe:
    running: bool
    info: dict[str, Any]


def probe_daemon(path: Path) -> DaemonProbe:
    """Running means: its lock is held *and* its recorded process is alive."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return DaemonProbe(False, {})
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
    finally:
        os.close(fd)
    info = read_daemon_info(path)
    pid = info.get("pid")
    running = held and isinstance(pid, int) and process_alive(pid, info.get("create_time"))
    return DaemonProbe(running, info)
