"""Process-group helpers: stop a process and everything it started, leave no orphans."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import signal
import time
from collections.abc import Callable

import psutil

PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")  # runs ldconfig: never call this after a fork
    if not name:
        return None
    func: Callable[..., int] | None = getattr(ctypes.CDLL(name, use_errno=True), "prctl", None)
    return func


def parent_death_preexec(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get ``sig`` when its parent dies (Linux only).

    A child started by an agent then dies with the agent even when the agent is killed with
    SIGKILL and gets no chance to clean up. libc is looked up now, before the fork. The race
    of a parent dying between fork and prctl is closed by checking, after prctl, that the
    parent is still the one that forked us; if not, the child exits at once.
    """
    prctl = _prctl()
    parent = os.getpid()

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        # ProcessLookupError: any process on the host may exit while we scan.
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members


def kill_group(pgid: int, grace: float, *, leader_start: float | None = None) -> bool:
    """SIGTERM a process group, SIGKILL it after ``grace`` seconds; True once it is gone.

    With ``leader_start``, the group is only signalled if its leader (pid == pgid) is the process
    that started then, or the leader is gone (the rest of the group are its orphans), so a
    recycled pid is never signalled.
    """
    if leader_start is not None:
        with contextlib.suppress(psutil.Error):
            created = psutil.Process(pgid).create_time()
            if abs(created - leader_start) >= 0.01:
                return True  # the pid was recycled: the group we knew is long gone
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_alive(pgid) or not _group_members(pgid):
                return True
            time.sleep(0.02)
    return not _group_members(pgid)


def kill_process(pid: int, grace: float, start_time: float | None) -> bool:
    """SIGTERM one process, SIGKILL it after ``grace``; True once it is gone (or was recycled)."""
    try:
        proc = psutil.Process(pid)
        if start_time is not None and abs(proc.create_time() - start_time) >= 0.01:
            return True
    except psutil.NoSuchProcess:
        return True
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            return True
        except psutil.TimeoutExpired:
            continue
        except psutil.NoSuchProcess:
            return True
    return False


def process_start_time(pid: int) -> float | None:
    """The process's start time as psutil reports it, or None if there is no such process."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def process_alive(pid: int, start_time: float | None) -> bool:
    """True if ``pid`` is running and is the same process that started at ``start_time``."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True
    return start_time is None or abs(created - start_time) < 0.01
