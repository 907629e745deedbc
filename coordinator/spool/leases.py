"""Agent leases: proof of life for every agent that may hold claims.

An agent creates ``agents/AGENT.lock`` *already locked* (written and flocked under a temporary
name, then renamed into place) before it makes its first claim, holds the flock until it dies, and
touches the file's mtime as its heartbeat. The kernel drops the flock when the process dies in any
way (crash, ``kill -9``, OOM), so a free flock proves death; psutil (pid plus process start time,
so a recycled pid is never mistaken for the owner) confirms it. A lock is broken only when its
owner is provably dead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from coordinator.proc import process_alive, process_start_time
from coordinator.spool.fsutil import write_file
from coordinator.spool.layout import SpoolLayout


class AgentLease:
    """The lease an agent process holds for its whole life. Not thread-safe; one per agent."""

    def __init__(self, layout: SpoolLayout, agent_id: str, info: dict[str, Any]) -> None:
        self.layout = layout
        self.agent_id = agent_id
        self.path = layout.lease_path(agent_id)
        pid = os.getpid()
        self.info = {
            "agent_id": agent_id,
            "pid": pid,
            "create_time": process_start_time(pid),
            "pgid": os.getpgid(0),
            "host": socket.gethostname(),
            "started_at": time.time(),
            **info,
        }
        tmp = layout.agents / f".{agent_id}.lock.tmp"
        write_file(tmp, json.dumps(self.info).encode("utf-8"), fsync=False)
        self._fd: int | None = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        # Lock before the name exists: a prober never sees this lease unlocked while we live.
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, self.path)

    def heartbeat(self) -> None:
        if self._fd is not None:
            os.utime(self._fd)

    def record_children(self, groups: dict[int, float | None]) -> None:
        """Record the process groups of this agent's children, for the reaper to kill if we die."""
        data = json.dumps({str(k): v for k, v in groups.items()}).encode("utf-8")
        tmp = self.layout.agents / f".{self.agent_id}.children.tmp"
        write_file(tmp, data, fsync=False)
        os.rename(tmp, self.layout.children_path(self.agent_id))

    def release(self) -> None:
        """Give up the lease at a clean exit (after every claim has been ended)."""
        if self._fd is None:
            return
        for path in (self.path, self.layout.children_path(self.agent_id)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(self._fd)
        self._fd = None


@dataclass(frozen=True, slots=True)
class AgentProbe:
    """What a lease says about its agent, checked against the kernel and the process table."""

    agent_id: str
    alive: bool
    info: dict[str, Any]
    heartbeat_age: float | None  # seconds since the last heartbeat; None without a lease

    @property
    def pid(self) -> int | None:
        pid = self.info.get("pid")
        return pid if isinstance(pid, int) else None


def probe_agent(layout: SpoolLayout, agent_id: str, now: float | None = None) -> AgentProbe:
    """Is the agent alive? Dead means: no lease, a free flock, or its process is gone."""
    path = layout.lease_path(agent_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return AgentProbe(agent_id, False, {}, None)
    try:
        st = os.fstat(fd)
        try:
            info = json.loads(os.pread(fd, 65536, 0) or b"{}")
        except ValueError:
            info = {}
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held = False  # we got it, so nobody holds it: the owner is dead
        except BlockingIOError:
            held = True
    finally:
        os.close(fd)  # also drops our shared lock if we took one
    pid = info.get("pid")
    alive = held and isinstance(pid, int) and process_alive(pid, info.get("create_time"))
    age = (now if now is not None else time.time()) - st.st_mtime
    return AgentProbe(agent_id, alive, info, age)


def read_children(layout: SpoolLayout, agent_id: str) -> dict[int, float | None]:
    try:
        raw = json.loads(layout.children_path(agent_id).read_bytes())
    except (FileNotFoundError, ValueError):
        return {}
    return {int(k): v for k, v in raw.items()} if isinstance(raw, dict) else {}


def list_agent_ids(layout: SpoolLayout) -> list[str]:
    return sorted(
        name[: -len(".lock")]
        for name in os.listdir(layout.agents)
        if name.endswith(".lock") and not name.startswith(".")
    )
