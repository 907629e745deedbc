"""The daemon's main loop: intake, supervision, reclaim, readiness, graceful stop.

On SIGTERM it stops intake, asks its agents to finish within ``shutdown_grace`` (what they cannot
finish they give back), reclaims what killed agents left behind, and exits 0. If it is killed
instead, a restarted daemon finds the truth on disk: the tasks are in the spool, and agents left
over from the dead daemon are stopped so their claims return to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from coordinator.config import Settings
from coordinator.daemon import sdnotify
from coordinator.daemon.intake import Intake
from coordinator.daemon.lock import DaemonLock
from coordinator.daemon.supervisor import Supervisor
from coordinator.errors import ConfigError
from coordinator.models import AgentSpec
from coordinator.proc import kill_group
from coordinator.specs import load_spec
from coordinator.spool.filespool import FileSpool
from coordinator.spool.fsutil import atomic_write
from coordinator.spool.layout import SpoolLayout
from coordinator.spool.leases import list_agent_ids, probe_agent
from coordinator.spool.reaper import Reaper
from coordinator.store import Store
from coordinator.taskfile import is_ignored

log = logging.getLogger(__name__)


def load_fleet(settings: Settings) -> dict[str, tuple[AgentSpec, Path]]:
    """Every spec in the agents directory, validated now so a bad one fails start-up."""
    directory = settings.agents_path
    fleet: dict[str, tuple[AgentSpec, Path]] = {}
    if not directory.is_dir():
        return fleet
    for path in sorted(directory.glob("*.toml")):
        if not path.name.startswith("."):
            spec = load_spec(path)
            fleet[spec.name] = (spec, path)
    return fleet


class Daemon:
    def __init__(self, settings: Settings, *, exit_when_idle: bool = False) -> None:
        self.settings = settings
        self.exit_when_idle = exit_when_idle
        self.layout = SpoolLayout(settings.spool_path)
        self.spool = FileSpool(self.layout)
        self.stop_requested = asyncio.Event()
        self._reap_now = asyncio.Event()
        self.started_at = time.time()

    def _check_paths(self) -> None:
        tasks = self.settings.tasks_path
        tasks.mkdir(parents=True, exist_ok=True)
        self.layout.ensure()
        if os.stat(tasks).st_dev != os.stat(self.layout.root).st_dev:
            raise ConfigError(
                f"{tasks} and {self.layout.root} are on different file systems; intake moves "
                "files between them with rename, so put them on the same one."
            )

    async def run(self) -> int:
        self._check_paths()
        fleet = load_fleet(self.settings)
        lock = DaemonLock(self.layout.daemon_lock)
        lock.acquire({"home": str(self.settings.home)})
        store = Store(self.settings.db_file)
        try:
            return await self._run(fleet, store)
        finally:
            store.close()
            lock.release()

    async def _run(self, fleet: dict[str, tuple[AgentSpec, Path]], store: Store) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        settings_file = self.layout.root / "daemon-settings.json"
        atomic_write(settings_file, self.settings.model_dump_json().encode("utf-8"), fsync=False)
        reaper = Reaper(
            self.spool,
            stall_timeout=self.settings.stall_timeout,
            kill_grace=self.settings.kill_grace,
        )
        await asyncio.to_thread(self._stop_orphans)
        await self._reap_once(reaper)
        intake = Intake(self.settings, self.spool, store, known_specs=set(fleet))
        intake.start()
        stop_intake = threading.Event()
        intake_thread = threading.Thread(
            target=intake.run, args=(stop_intake,), name="intake", daemon=True
        )
        intake_thread.start()
        supervisor = Supervisor(self.settings, fleet, settings_file, on_exit=self._reap_now.set)
        tasks = [
            asyncio.create_task(supervisor.run()),
            asyncio.create_task(self._reap_loop(reaper)),
            asyncio.create_task(self._report_loop(supervisor, intake)),
        ]
        log.info(
            "daemon started (pid %d): home %s, %d spec(s), %d agent process(es)",
            os.getpid(), self.settings.home, len(fleet), len(supervisor.slots),
        )
        sdnotify.ready()
        if self.exit_when_idle:
            tasks.append(asyncio.create_task(self._idle_watch(intake)))
        await self.stop_requested.wait()
        log.info("daemon stopping: intake closed, agents get %.0fs to finish",
                 self.settings.shutdown_grace)
        sdnotify.stopping()
        stop_intake.set()
        intake.wakeup.set()
        await asyncio.to_thread(intake_thread.join)  # lets a pass under way finish its batch
        intake.close()
        # Agents get shutdown_grace to finish, then stop their children (up to their kill
        # grace) and give back what is left; only after that margin are they killed.
        await supervisor.stop(self.settings.shutdown_grace + self.settings.kill_grace + 10.0)
        log.debug("agents stopped; cancelling the daemon's loops")
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        log.debug("loops cancelled; final reclaim pass")
        await self._reap_once(reaper)  # claims of agents that had to be killed
        self._write_report(supervisor, intake, stopped=True)
        log.info("daemon stopped")
        return 0

    def _stop_orphans(self) -> None:
        """Stop agents left by a previous daemon that died without stopping them."""
        for agent_id in list_agent_ids(self.layout):
            probe = probe_agent(self.layout, agent_id)
            sup = probe.info.get("supervisor")
            if probe.alive and isinstance(sup, int) and sup != os.getpid() and probe.pid:
                log.warning("stopping agent %s (pid %d) left by a dead daemon", agent_id,
                            probe.pid)
                kill_group(probe.pid, self.settings.kill_grace,
                           leader_start=probe.info.get("create_time"))

    async def _reap_loop(self, reaper: Reaper) -> None:
        while True:
            await self._reap_once(reaper)
            self._reap_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.reap_interval):
                    await self._reap_now.wait()

    async def _reap_once(self, reaper: Reaper) -> None:
        try:
            await asyncio.to_thread(reaper.reap)
        except Exception:
            # A failed pass loses nothing (the next one starts over from the files).
            log.exception("reap pass failed; will retry")

    async def _idle_watch(self, intake: Intake) -> None:
        """``--exit-when-idle``: stop once nothing is pending, queued or claimed, twice in a row."""
        idle_passes = 0
        while True:
            await asyncio.sleep(0.2)
            busy = (
                intake.pending
                or os.listdir(self.layout.queue)
                or os.listdir(self.layout.claims)
                or any(not is_ignored(n) for n in os.listdir(self.settings.tasks_path))
            )
            idle_passes = 0 if busy else idle_passes + 1
            if idle_passes >= 3:
                log.info("queue empty and nothing running: exiting (--exit-when-idle)")
                self.stop_requested.set()
                return

    async def _report_loop(self, supervisor: Supervisor, intake: Intake) -> None:
        interval = sdnotify.watchdog_interval() or 1.0
        while True:
            report = self._write_report(supervisor, intake)
            sdnotify.watchdog_ping()
            sdnotify.status(report["summary"])
            await asyncio.sleep(min(interval, 1.0))

    def _write_report(
        self, supervisor: Supervisor, intake: Intake, stopped: bool = False
    ) -> dict[str, Any]:
        slots = [s for spec in supervisor.report().values() for s in spec]
        running = sum(1 for s in slots if s["state"] == "running")
        looping = sum(1 for s in slots if s["state"] == "crash-loop")
        summary = (
            f"{running}/{len(slots)} agents running"
            + (f", {looping} in crash-loop" if looping else "")
            + f"; accepted {intake.stats.accepted}, rejected {intake.stats.rejected}"
        )
        report: dict[str, Any] = {
            "summary": summary,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "updated_at": time.time(),
            "stopped": stopped,
            "specs": supervisor.report(),
            "intake": {
                "accepted": intake.stats.accepted,
                "rejected": intake.stats.rejected,
                "pending": intake.pending,
            },
        }
        atomic_write(self.layout.daemon_report, json.dumps(report).encode("utf-8"), fsync=False)
        return report
