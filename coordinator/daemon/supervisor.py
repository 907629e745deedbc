"""Supervision of agent processes: start what each spec asks for, restart crashes with backoff,
give up on a crash loop with a clear state, stop everything on shutdown.

A slot is one agent process a spec asks for (``processes = N`` gives N slots). Each start uses a
fresh agent id, so a claim can always be traced to the one process that made it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.agent.process import new_agent_id
from coordinator.config import Settings
from coordinator.daemon import sdnotify
from coordinator.models import AgentSpec
from coordinator.proc import parent_death_preexec

log = logging.getLogger(__name__)


class SlotState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"  # crashed; waiting before the next start
    CRASH_LOOP = "crash-loop"  # crashed too often: given up, needs an operator
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class Slot:
    spec: AgentSpec
    spec_path: Path
    index: int
    state: SlotState = SlotState.STOPPED
    proc: asyncio.subprocess.Process | None = None
    agent_id: str | None = None
    restarts: int = 0
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    last_exit: int | None = None
    next_start: float = 0.0

    def report(self) -> dict[str, Any]:
        return {
            "slot": self.index,
            "state": self.state.value,
            "agent_id": self.agent_id,
            "pid": self.proc.pid if self.proc and self.proc.returncode is None else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }


class Supervisor:
    """Keeps each spec's agent processes running. Drive it with :meth:`run` on the event loop."""

    def __init__(
        self,
        settings: Settings,
        specs: dict[str, tuple[AgentSpec, Path]],
        settings_file: Path,
        on_exit: Any = None,
    ) -> None:
        self.settings = settings
        self.settings_file = settings_file
        self.slots = [
            Slot(spec, path, i)
            for spec, path in specs.values()
            for i in range(spec.processes)
        ]
        self.on_exit = on_exit  # called after an agent exits (to reap its claims at once)
        self.stopping = False
        self._waiters: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    async def _start(self, slot: Slot) -> None:
        slot.agent_id = new_agent_id(slot.spec.name)
        argv = [
            sys.executable, "-m", "coordinator", "agent",
            "--spec", str(slot.spec_path),
            "--settings-file", str(self.settings_file),
            "--agent-id", slot.agent_id,
            "--supervisor-pid", str(os.getpid()),
        ]
        slot.state = SlotState.STARTING
        # systemd's notify socket is the daemon's alone (NotifyAccess=main).
        env = {k: v for k, v in os.environ.items() if k not in sdnotify.NOTIFY_VARIABLES}
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own group, so a stalled agent is killed whole
                # An agent whose daemon dies gets SIGTERM and gives its claims back: no agent
                # is left running unsupervised (a restarted daemon also stops leftovers).
                preexec_fn=parent_death_preexec(signal.SIGTERM),
            )
        except OSError as exc:
            log.error("cannot start agent for spec %s: %s", slot.spec.name, exc)
            self._crashed(slot, None)
            return
        slot.state = SlotState.RUNNING
        log.info("started agent %s (spec %s, pid %d)", slot.agent_id, slot.spec.name,
                 slot.proc.pid, extra={"agent": slot.agent_id})
        waiter = asyncio.create_task(self._wait(slot, slot.proc))
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)

    async def _wait(self, slot: Slot, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        slot.last_exit = code
        if self.on_exit is not None:
            self.on_exit()
        if self.stopping:
            slot.state = SlotState.STOPPED
        elif code == 0:
            log.warning("agent %s exited on its own (status 0); starting a new one",
                        slot.agent_id)
            slot.state = SlotState.BACKOFF
            slot.next_start = time.monotonic() + self.settings.restart_backoff
        else:
            self._crashed(slot, code)
        self._changed.set()

    def _crashed(self, slot: Slot, code: int | None) -> None:
        now = time.monotonic()
        slot.crashes.append(now)
        while slot.crashes and slot.crashes[0] < now - self.settings.crash_loop_window:
            slot.crashes.popleft()
        if len(slot.crashes) >= self.settings.crash_loop_restarts:
            slot.state = SlotState.CRASH_LOOP
            log.error(
                "agent slot %s/%d crashed %d times in %.0fs (last status %s): giving up; fix the "
                "spec or backend and restart the daemon",
                slot.spec.name, slot.index, len(slot.crashes),
                self.settings.crash_loop_window, code,
            )
            return
        delay = min(
            self.settings.restart_backoff * 2 ** (len(slot.crashes) - 1),
            self.settings.restart_backoff_max,
        )
        slot.state = SlotState.BACKOFF
        slot.next_start = now + delay
        log.warning("agent %s (spec %s) exited with status %s; restarting in %.1fs",
                    slot.agent_id, slot.spec.name, code, delay)

    async def run(self) -> None:
        """Start every slot, then restart crashed ones as their backoff expires."""
        while not self.stopping:
            now = time.monotonic()
            for slot in self.slots:
                if slot.state is SlotState.STOPPED or (
                    slot.state is SlotState.BACKOFF and now >= slot.next_start
                ):
                    if slot.state is SlotState.BACKOFF:
                        slot.restarts += 1
                    await self._start(slot)
            waits = [s.next_start - now for s in self.slots if s.state is SlotState.BACKOFF]
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, min(waits, default=1.0))):
                    await self._changed.wait()

    async def stop(self, grace: float) -> None:
        """SIGTERM every agent, wait up to ``grace`` for them to finish, then SIGKILL."""
        self.stopping = True
        self._changed.set()
        live = [s for s in self.slots if s.proc is not None and s.proc.returncode is None]
        for slot in live:
            slot.state = SlotState.STOPPING
            assert slot.proc is not None
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for slot in live:
            assert slot.proc is not None
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await slot.proc.wait()
            except TimeoutError:
                log.warning("agent %s did not stop within %.0fs: killing it", slot.agent_id,
                            grace)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(slot.proc.pid, signal.SIGKILL)
                await slot.proc.wait()
            slot.state = SlotState.STOPPED
        for waiter in list(self._waiters):
            with contextlib.suppress(asyncio.CancelledError):
                await waiter

    def report(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for slot in self.slots:
            out.setdefault(slot.spec.name, []).append(slot.report())
        return out
