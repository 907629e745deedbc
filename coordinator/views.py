"""Read models shared by the CLI (and later the dashboards, API and MCP server).

Status is built from the truth: the daemon lock and agent leases are checked against the kernel
(held flocks) and the process table (psutil), and "running" lists only claims whose agent is
provably alive. Counts of ended tasks come from the database record.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from coordinator.config import Settings
from coordinator.daemon.lock import probe_daemon
from coordinator.errors import CoordinatorError, TaskNotFound
from coordinator.models import TaskView, is_valid_name
from coordinator.spool.filespool import FileSpool
from coordinator.spool.layout import SpoolLayout
from coordinator.spool.leases import list_agent_ids, probe_agent
from coordinator.states import TaskState
from coordinator.store import Store
from coordinator.store.rebuild import rejected_name
from coordinator.taskfile import is_ignored, split_name


def fleet_status(settings: Settings) -> dict[str, Any]:
    """The ``coordinator status --json`` document."""
    layout = SpoolLayout(settings.spool_path)
    now = time.time()
    daemon = probe_daemon(layout.daemon_lock) if layout.root.exists() else None
    running = bool(daemon and daemon.running)
    report: dict[str, Any] = {}
    if running:
        try:
            report = json.loads(layout.daemon_report.read_bytes())
        except (FileNotFoundError, ValueError):
            report = {}
    claims = layout.list_claims() if layout.claims.exists() else []
    agents = []
    live_agents: set[str] = set()
    ids = set(list_agent_ids(layout)) if layout.agents.exists() else set()
    for agent_id in sorted(ids | {c.agent_id for c in claims}):
        probe = probe_agent(layout, agent_id, now)
        held = sorted(c.task_id for c in claims if c.agent_id == agent_id)
        stall = probe.info.get("stall_timeout")
        if not probe.alive:
            state = "dead"
        elif isinstance(stall, int | float) and (probe.heartbeat_age or 0) > stall:
            state = "stalled"
        else:
            state = "busy" if held else "idle"
            live_agents.add(agent_id)
        agents.append({
            "agent_id": agent_id,
            "spec": probe.info.get("spec"),
            "pid": probe.pid,
            "host": probe.info.get("host"),
            "alive": probe.alive,
            "state": state,
            "tasks": held,
            "heartbeat_age": None if probe.heartbeat_age is None
            else round(probe.heartbeat_age, 3),
        })
    counts = {state.value: 0 for state in TaskState}
    if settings.db_file.exists():
        try:
            with Store(settings.db_file) as store:
                counts.update(store.counts_by_state())
        except CoordinatorError:
            pass
    counts["queued"] = len(os.listdir(layout.queue)) if layout.queue.exists() else 0
    counts["claimed"] = sum(1 for c in claims if c.agent_id in live_agents)
    tasks_dir = settings.tasks_path
    pending = (
        sum(1 for n in os.listdir(tasks_dir) if not is_ignored(n)) if tasks_dir.exists() else 0
    )
    return {
        "home": str(settings.home),
        "daemon": {
            "running": running,
            "pid": daemon.info.get("pid") if daemon and running else None,
            "started_at": daemon.info.get("started_at") if daemon and running else None,
        },
        "slots": report.get("specs", {}),
        "agents": agents,
        "running": [
            {"task_id": c.task_id, "attempt": c.attempt, "agent_id": c.agent_id}
            for c in sorted(claims, key=lambda c: c.task_id)
            if c.agent_id in live_agents
        ],
        "orphaned_claims": sum(1 for c in claims if c.agent_id not in live_agents),
        "counts": counts,
        "pending_files": pending,
    }


def task_view(settings: Settings, task_id: str) -> TaskView:
    """Everything about one task, from the spool. Raises ``TaskNotFound``."""
    spool = FileSpool(SpoolLayout(settings.spool_path))
    if is_valid_name(task_id) and spool.layout.envelope_path(task_id).exists():
        envelope = spool.read_envelope(task_id)
        loc = spool.locate(task_id)
        attempts = spool.attempts_at(task_id, loc)
        view = TaskView(
            id=task_id,
            state=loc.state,
            priority=envelope.task.priority,
            agent=envelope.task.agent,
            source=envelope.source,
            accepted_at=envelope.accepted_at,
            attempts=attempts,
            claimed_by=loc.claim.agent_id if loc.claim else None,
        )
        if loc.state is TaskState.DONE:
            result = spool.read_result(task_id, loc.attempt) or {}
            view.output = result.get("output")
            view.usage = result.get("usage")
        elif loc.state is TaskState.FAILED:
            ended = [a for a in attempts if a.reason]
            view.reason = ended[-1].reason if ended else "failed"
        elif loc.state is TaskState.CANCELLED:
            view.reason = "cancelled by the operator"
        return view
    rejected = find_rejected_file(spool.layout, task_id)
    if rejected is not None:
        name, reason = rejected
        return TaskView(id=task_id, state=TaskState.REJECTED, source=name, reason=reason)
    raise TaskNotFound(f"no task {task_id!r} (nor a rejected file of that name)")


def find_rejected_file(layout: SpoolLayout, task_id: str) -> tuple[str, str] | None:
    """The newest rejected file whose name (without stamp and suffix) is ``task_id``."""
    if not layout.rejected.exists():
        return None
    best: tuple[str, str] | None = None
    for name in sorted(os.listdir(layout.rejected)):
        if name.endswith(".reason"):
            continue
        original = rejected_name(name)
        if original == task_id or split_name(original)[0] == task_id:
            try:
                reason = (layout.rejected / f"{name}.reason").read_text("utf-8").strip()
            except FileNotFoundError:
                reason = "rejected (reason file missing)"
            reason = reason.removeprefix(f"{original}: ")
            best = (original, reason)
    return best


def partial_output(settings: Settings, task_id: str, attempt: int) -> str:
    spool = FileSpool(SpoolLayout(settings.spool_path))
    return spool.read_partial(task_id, attempt)


def task_exists(settings: Settings, task_id: str) -> bool:
    try:
        task_view(settings, task_id)
    except TaskNotFound:
        return False
    return True
