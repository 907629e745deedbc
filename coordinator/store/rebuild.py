"""Rebuild the record of tasks, attempts and rejected files from the spool alone.

The spool is the truth; the database is a record of it that may have been lost, restored from
an old backup, or missed writes. :func:`rebuild` throws away the rebuildable tables and reads
them back from the files. Events are history the spool does not hold: they are kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from coordinator.errors import SpoolError, TaskNotFound
from coordinator.models import AttemptRecord, TaskEnvelope, is_valid_name
from coordinator.spool.filespool import FileSpool, Location
from coordinator.states import TaskState
from coordinator.store.db import Store

log = logging.getLogger(__name__)

REASON_SUFFIX = ".reason"
STAMP_SEP = "-"


def rebuild(store: Store, spool: FileSpool) -> dict[str, int]:
    """Replace the store's tasks, attempts and rejected rows with what the spool says.

    Returns counts: ``tasks``, ``attempts`` and ``rejected`` recorded, and ``skipped`` task
    directories that are not (or not yet, or no longer readably) accepted tasks. Appends one
    ``rebuild`` event carrying those counts; earlier events are kept.

    Everything happens in one write transaction, and the spool is read *inside* it: an agent
    that moves a token while we read waits for our commit before it records the move, so its
    record lands on top of ours instead of being overwritten by our older view. Readers see
    the old record or the new one, never a half-built one. Raises ``StoreError``; a task
    directory that cannot be read is skipped (and logged), not fatal; a spool that cannot be
    listed raises ``SpoolError`` and leaves the old record as it was.
    """
    counts = {"tasks": 0, "attempts": 0, "rejected": 0, "skipped": 0}
    with _spool_errors(spool), store.batch():
        store.clear_rebuildable()
        for task_id in _task_ids(spool):
            recorded = _rebuild_task(store, spool, task_id)
            if recorded is None:
                counts["skipped"] += 1
            else:
                counts["tasks"] += 1
                counts["attempts"] += recorded
        counts["rejected"] = _rebuild_rejected(store, spool)
        store.record_event("rebuild", data=dict(counts))
    log.info("store: rebuilt the record from %s: %s", spool.layout.root, counts)
    return counts


@contextlib.contextmanager
def _spool_errors(spool: FileSpool) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise SpoolError(f"cannot read the spool {spool.layout.root}: {exc}") from exc


def _task_ids(spool: FileSpool) -> list[str]:
    try:
        names = os.listdir(spool.layout.tasks)
    except FileNotFoundError:
        return []
    # Anything that is not a valid id (a temporary or hidden entry) was never a task.
    return sorted(name for name in names if is_valid_name(name))


def _read_task(spool: FileSpool, task_id: str) -> tuple[TaskEnvelope, Location] | None:
    try:
        envelope = spool.read_envelope(task_id)
    except TaskNotFound:
        return None  # accept() crashed before task.json was in place: it was never accepted
    except ValueError as exc:
        log.warning("rebuild: task %s has an unreadable task.json: %s", task_id, exc)
        return None
    try:
        location = spool.locate(task_id)
    except SpoolError as exc:
        # The token is missing (accept() crashed between task.json and its token; intake
        # recreates it on restart) or kept moving: the next rebuild will see it.
        log.warning("rebuild: task %s skipped: %s", task_id, exc, extra={"task_id": task_id})
        return None
    return envelope, location


def _rebuild_task(store: Store, spool: FileSpool, task_id: str) -> int | None:
    """Record one task and its attempts; the number of attempts, or None if skipped."""
    found = _read_task(spool, task_id)
    if found is None:
        return None
    envelope, location = found
    current = location.attempt if location.state is TaskState.CLAIMED else None
    attempts = spool.attempts_at(task_id, location)
    if location.claim is not None and all(r.number != current for r in attempts):
        # The claim is there but its start record is not logged yet: an attempt under way.
        attempts.append(AttemptRecord(number=location.attempt, agent=location.claim.agent_id))
    store.record_accepted(envelope)
    for record in attempts:
        store.record_attempt(task_id, record)
    store.record_state(
        task_id,
        location.state,
        _reason(location.state, attempts),
        at=_updated_at(envelope, attempts),
    )
    return len(attempts)


def _reason(state: TaskState, attempts: list[AttemptRecord]) -> str | None:
    """Why an ended task is where it is: its last attempt's reason (None for done or live)."""
    if state in (TaskState.FAILED, TaskState.CANCELLED) and attempts:
        return attempts[-1].reason
    return None


def _updated_at(envelope: TaskEnvelope, attempts: list[AttemptRecord]) -> float:
    times = [envelope.accepted_at]
    for record in attempts:
        times.extend(t for t in (record.started_at, record.ended_at) if t is not None)
    return max(times)


def _rebuild_rejected(store: Store, spool: FileSpool) -> int:
    """Record every ``rejected/STAMP-NAME.reason``; return how many were recorded."""
    directory = spool.layout.rejected
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return 0
    rows: list[dict[str, Any]] = []
    for entry in entries:
        # Dot-names are temporary files of an atomic write still in progress.
        if entry.startswith(".") or not entry.endswith(REASON_SUFFIX):
            continue
        path = directory / entry
        try:
            reason = path.read_text("utf-8", "replace").strip()
            at = path.stat().st_mtime
        except FileNotFoundError:
            continue  # removed while we looked (an operator cleaning up)
        file = entry.removesuffix(REASON_SUFFIX)
        rows.append({"name": rejected_name(file), "file": file, "reason": reason, "at": at})
    # Oldest first, so that when one name was rejected several times the latest wins.
    for row in sorted(rows, key=lambda r: (r["at"], r["file"])):
        store.record_rejected(row["name"], row["reason"], row["at"], file=row["file"])
    return len({row["name"] for row in rows})


def rejected_name(file: str) -> str:
    """``bad.toml`` for ``20250101T000000Z-bad.toml``: the name the file was dropped as.

    The stamp ends at the first ``-`` (stamps contain none); a name without one is returned
    as it is.
    """
    stamp, sep, name = file.partition(STAMP_SEP)
    return name if sep and stamp and name else file
