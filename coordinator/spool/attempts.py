"""The per-task attempt log (``tasks/ID/attempts.jsonl``): what happened to each attempt.

The log is history, not the truth about who holds a task (the token is). Whoever wins the rename
that ends an attempt appends its end record *after* the rename, so a record never claims an edge
that did not happen; an attempt whose end record is missing because its writer died in between
is reported as ``crashed``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from coordinator.models import AttemptRecord
from coordinator.spool.fsutil import append_line
from coordinator.states import AttemptOutcome


def log_event(path: Path, event: str, **fields: Any) -> None:
    record = {"event": event, "at": round(time.time(), 6), **fields}
    append_line(path, json.dumps(record, separators=(",", ":")).encode("utf-8"))


def read_events(path: Path) -> list[dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    events = []
    for line in raw.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue  # a torn last line after a crash: skip it, the rest is intact
        if isinstance(value, dict):
            events.append(value)
    return events


def fold_attempts(
    events: list[dict[str, Any]], current_attempt: int | None
) -> tuple[list[AttemptRecord], int]:
    """Fold log events into one record per attempt, and the number of the last retry marker.

    ``current_attempt`` is the attempt that holds the claim now, if any: it is ``running``; any
    other attempt without an end record is ``crashed``.
    """
    records: dict[int, AttemptRecord] = {}
    retry_after = 0
    for event in events:
        kind = event.get("event")
        if kind == "retry":
            retry_after = max(retry_after, int(event.get("after", 0)))
            continue
        number = event.get("n")
        if kind not in ("start", "end") or not isinstance(number, int):
            # e.g. "cancel" of a queued token: attempt n never started. Folding it made a
            # phantom attempt that `show` reported as crashed ("ended without an end record").
            continue
        record = records.get(number)
        if record is None:
            record = records[number] = AttemptRecord(number=number, agent=event.get("agent", ""))
        if kind == "start":
            record.agent = event.get("agent", record.agent)
            record.pid = event.get("pid")
            record.started_at = event.get("at")
        elif kind == "end":
            outcome = AttemptOutcome(event.get("outcome", "failed"))
            if record.outcome is AttemptOutcome.RUNNING or (
                record.outcome is AttemptOutcome.SUPERSEDED
                and outcome is not AttemptOutcome.SUPERSEDED
            ):
                record.outcome = outcome
                record.reason = event.get("reason")
                record.ended_at = event.get("at")
                if not record.agent:
                    record.agent = event.get("agent", "")
    for number, record in records.items():
        if record.outcome is AttemptOutcome.RUNNING and number != current_attempt:
            record.outcome = AttemptOutcome.CRASHED
            record.reason = record.reason or "the attempt ended without an end record"
    return [records[n] for n in sorted(records)], retry_after


def failures_before(events: list[dict[str, Any]], attempt: int) -> int:
    """Attempts before ``attempt`` (since the last retry) that count against ``max_attempts``."""
    records, retry_after = fold_attempts(events, current_attempt=attempt)
    return sum(
        1
        for r in records
        if retry_after < r.number < attempt and r.outcome.counts_against_budget
    )
