"""``FileSpool``: every state transition of a task, each one an atomic rename of its token.

Guarantees (each has a test): an accepted task survives a crash of any process at any instant;
at most one attempt holds a task; a completion is accepted only from the attempt that still holds
the claim (``ClaimLost`` otherwise); a task has at most one result. Not guaranteed: the attempt
log is history and may miss an end record if its writer dies right after the rename.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.errors import ClaimLost, SpoolError, StateConflict, TaskNotFound
from coordinator.models import AttemptRecord, Task, TaskEnvelope, is_valid_name
from coordinator.spool import attempts as alog
from coordinator.spool.fsutil import atomic_write, syncfs, write_file
from coordinator.spool.layout import (
    ANY_AGENT,
    SEP,
    ClaimName,
    QueueName,
    SpoolLayout,
    terminal_marker,
)
from coordinator.states import AttemptOutcome, TaskState, check_transition

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Location:
    """Where a task's token is now."""

    state: TaskState
    path: Path
    attempt: int
    claim: ClaimName | None = None
    queue: QueueName | None = None


@dataclass(frozen=True, slots=True)
class Submission:
    """One validated task waiting to be accepted by :meth:`FileSpool.accept`."""

    task: Task
    source: str
    source_sha256: str
    max_attempts: int
    source_inode: int | None = None  # tells a crash leftover from the same bytes dropped again


@dataclass(frozen=True, slots=True)
class Accepted:
    task_id: str
    queue: QueueName | None  # None: it had been accepted before (a leftover source file)
    duplicate_of_other: bool = False  # the id is taken by a different task
    envelope: TaskEnvelope | None = None


class SeqClock:
    """Arrival numbers: microseconds since the epoch, strictly increasing within a process."""

    def __init__(self, floor: int = 0) -> None:
        self._last = floor

    def next(self) -> int:
        self._last = max(self._last + 1, time.time_ns() // 1000)
        return self._last


class FileSpool:
    """The task spool on one local file system (not NFS: rename and flock must be local)."""

    def __init__(self, layout: SpoolLayout) -> None:
        self.layout = layout

    # ------------------------------------------------------------------ reading

    def read_envelope(self, task_id: str) -> TaskEnvelope:
        if not is_valid_name(task_id):
            raise TaskNotFound(f"{task_id!r} is not a valid task id")
        try:
            raw = self.layout.envelope_path(task_id).read_bytes()
        except FileNotFoundError as exc:
            raise TaskNotFound(f"no task {task_id!r} in {self.layout.root}") from exc
        return TaskEnvelope.model_validate_json(raw)

    def queue_name(self, envelope: TaskEnvelope, attempt: int) -> QueueName:
        task = envelope.task
        return QueueName(task.priority, envelope.seq, task.id, attempt, task.agent or ANY_AGENT)

    def locate(self, task_id: str) -> Location:
        """Find a task's token. Raises ``TaskNotFound``, or ``SpoolError`` if it has none."""
        envelope = self.read_envelope(task_id)
        task_dir = self.layout.task_dir(task_id)
        for entry in os.listdir(task_dir):
            marker = terminal_marker(entry)
            if marker is not None:
                return Location(marker[0], task_dir / entry, marker[1])
        for claim in self.layout.list_claims():
            if claim.task_id == task_id:
                return Location(
                    TaskState.CLAIMED, self.layout.claim_path(claim), claim.attempt, claim=claim
                )
        events = alog.read_events(self.layout.attempts_log(task_id))
        highest = max((int(e["n"]) for e in events if isinstance(e.get("n"), int)), default=0)
        for attempt in range(highest + 1, 0, -1):
            name = self.queue_name(envelope, attempt)
            if self.layout.queue_path(name).exists():
                return Location(
                    TaskState.QUEUED, self.layout.queue_path(name), attempt, queue=name
                )
        # The attempt log can lag its token by one write; fall back to a listing.
        for name in self.layout.list_queue():
            if name.task_id == task_id:
                return Location(
                    TaskState.QUEUED, self.layout.queue_path(name), name.attempt, queue=name
                )
        # A claim can move while we look (claims -> done between our two listings): look again.
        for entry in os.listdir(task_dir):
            marker = terminal_marker(entry)
            if marker is not None:
                return Location(marker[0], task_dir / entry, marker[1])
        raise SpoolError(f"task {task_id!r} has no token in the spool (it is being moved?)")

    def attempts(self, task_id: str, current: int | None = None) -> list[AttemptRecord]:
        """The task's attempts; ``current`` is the attempt holding the claim now, if any."""
        events = alog.read_events(self.layout.attempts_log(task_id))
        return alog.fold_attempts(events, current)[0]

    def attempts_at(self, task_id: str, loc: Location) -> list[AttemptRecord]:
        """The attempts of the task at ``loc``, consistent with where its token is.

        The attempt that holds the claim is running; the attempt a terminal token names ended
        that way even if its end record was lost (its writer died right after the rename).
        """
        records = self.attempts(task_id, loc.attempt if loc.claim else None)
        settled = {
            TaskState.DONE: AttemptOutcome.DONE,
            TaskState.FAILED: AttemptOutcome.FAILED,
            TaskState.CANCELLED: AttemptOutcome.CANCELLED,
        }.get(loc.state)
        for record in records:
            if (
                settled is not None
                and record.number == loc.attempt
                and record.outcome is AttemptOutcome.CRASHED
                and record.ended_at is None
            ):
                record.outcome = settled
                record.reason = None
        return records

    def read_result(self, task_id: str, attempt: int) -> dict[str, Any] | None:
        try:
            value = json.loads(self.layout.result_path(task_id, attempt).read_bytes())
        except FileNotFoundError:
            return None
        return value if isinstance(value, dict) else None

    def read_partial(self, task_id: str, attempt: int) -> str:
        try:
            return self.layout.partial_path(task_id, attempt).read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------ intake

    def accept(self, batch: list[Submission], clock: SeqClock) -> list[Accepted]:
        """Accept validated tasks durably, with two file-system flushes for the whole batch.

        Order (each step durable before the next; a crash anywhere redoes the batch on restart):
        write ``task.json`` under a temporary name, flush, rename it and create the queue token,
        flush. Only after this returns may the caller move the source files away.
        """
        staged: list[tuple[Submission, Path, TaskEnvelope]] = []
        results: list[Accepted] = []
        for sub in batch:
            task_dir = self.layout.task_dir(sub.task.id)
            try:
                task_dir.mkdir()
            except FileExistsError:
                outcome = self._existing(sub)
                if outcome is not None:
                    results.append(outcome)
                    continue
            envelope = TaskEnvelope(
                task=sub.task,
                seq=clock.next(),
                accepted_at=time.time(),
                source=sub.source,
                source_sha256=sub.source_sha256,
                source_inode=sub.source_inode,
                max_attempts=sub.max_attempts,
            )
            tmp = task_dir / ".task.json.tmp"
            write_file(tmp, envelope.model_dump_json().encode("utf-8"), fsync=False)
            staged.append((sub, tmp, envelope))
        if not staged:
            return results
        syncfs(self.layout.root)
        for sub, tmp, envelope in staged:
            os.rename(tmp, self.layout.envelope_path(sub.task.id))
            name = self.queue_name(envelope, 1)
            # QUEUED: the token is born; O_EXCL so a bug can never create a second one.
            os.close(os.open(self.layout.queue_path(name), os.O_CREAT | os.O_EXCL, 0o644))
            results.append(Accepted(sub.task.id, name, envelope=envelope))
        syncfs(self.layout.root)
        return results

    def _existing(self, sub: Submission) -> Accepted | None:
        """The id's directory exists: a leftover of our own crash, or another task's id."""
        try:
            envelope = self.read_envelope(sub.task.id)
        except (TaskNotFound, ValueError):
            return None  # crashed before task.json was in place: accept it afresh
        same_file = envelope.source_sha256 == sub.source_sha256 and (
            envelope.source_inode is None
            or sub.source_inode is None
            or envelope.source_inode == sub.source_inode
        )
        if not same_file:
            # Another task with this id, or the same bytes dropped again as a new file: only
            # the very file we accepted (same inode) is a leftover of a crash before its move.
            return Accepted(sub.task.id, None, duplicate_of_other=True, envelope=envelope)
        if not self.has_token(sub.task.id, envelope):
            name = self.queue_name(envelope, 1)
            os.close(os.open(self.layout.queue_path(name), os.O_CREAT | os.O_EXCL, 0o644))
            syncfs(self.layout.root)
            log.warning("task %s: recreated its queue token after a crash", sub.task.id)
            return Accepted(sub.task.id, name, envelope=envelope)
        return Accepted(sub.task.id, None, envelope=envelope)

    def has_token(self, task_id: str, envelope: TaskEnvelope) -> bool:
        """True if the task's token exists anywhere (it always does once accept returned)."""
        if self.layout.queue_path(self.queue_name(envelope, 1)).exists():
            return True
        if self.layout.attempts_log(task_id).exists():
            return True  # it was claimed at least once, so its token had been created
        if any(terminal_marker(e) for e in os.listdir(self.layout.task_dir(task_id))):
            return True
        return any(c.task_id == task_id for c in self.layout.list_claims())

    # ------------------------------------------------------------------ agent side

    def claim(self, name: QueueName, agent_id: str) -> ClaimName | None:
        """Try to take a queued task for ``agent_id``. None if another process took it first."""
        claim = ClaimName(name, agent_id)
        try:
            # QUEUED -> CLAIMED: the rename is the claim; of racing agents exactly one wins.
            os.rename(self.layout.queue_path(name), self.layout.claim_path(claim))
        except FileNotFoundError:
            return None
        return claim

    def start_attempt(self, claim: ClaimName, pid: int) -> None:
        alog.log_event(
            self.layout.attempts_log(claim.task_id),
            "start",
            n=claim.attempt,
            agent=claim.agent_id,
            pid=pid,
        )

    def holds(self, claim: ClaimName) -> bool:
        """True while ``claim`` is still this attempt's (not reclaimed or cancelled)."""
        return self.layout.claim_path(claim).exists()

    def complete_batch(self, items: list[tuple[ClaimName, dict[str, Any]]]) -> list[bool]:
        """Commit results; True for each one whose attempt still held its claim.

        Results are written, flushed once for the batch (group commit), renamed into place, and
        then each claim is fenced: ``rename(claim, done~N)`` succeeds only if the claim is still
        there. A result whose fence fails is removed and its attempt logged as superseded.
        """
        for claim, result in items:
            tmp = self._result_tmp(claim)
            write_file(tmp, json.dumps(result).encode("utf-8"), fsync=False)
        if items:
            syncfs(self.layout.root)
        accepted = []
        for claim, _ in items:
            final = self.layout.result_path(claim.task_id, claim.attempt)
            os.rename(self._result_tmp(claim), final)
            ok = self._move_claim(claim, TaskState.DONE, AttemptOutcome.DONE, None)
            if not ok:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final)
            accepted.append(ok)
        return accepted

    def complete(self, claim: ClaimName, result: dict[str, Any]) -> None:
        """Commit one result. Raises ``ClaimLost`` if the attempt no longer holds the claim."""
        if not self.complete_batch([(claim, result)])[0]:
            raise ClaimLost(f"task {claim.task_id} attempt {claim.attempt}: claim lost")

    def _result_tmp(self, claim: ClaimName) -> Path:
        return self.layout.task_dir(claim.task_id) / f".result{SEP}{claim.attempt}.tmp"

    def end_attempt(
        self,
        claim: ClaimName,
        outcome: AttemptOutcome,
        reason: str | None,
        *,
        by: str,
        final: bool = False,
    ) -> TaskState | None:
        """End a claimed attempt that did not complete. Returns the task's new state.

        RELEASED and failures with attempts left requeue the task as attempt N+1; a failure that
        exhausts ``max_attempts`` fails it; CANCELLED cancels it. A result already written for
        this attempt (its agent died between writing it and fencing) is promoted to DONE instead
        of running the task again. ``final`` fails the task at once (an error that retrying
        cannot fix). Returns None if someone else moved the claim first.
        """
        if outcome is not AttemptOutcome.CANCELLED and self.layout.result_path(
            claim.task_id, claim.attempt
        ).exists():
            ok = self._move_claim(claim, TaskState.DONE, AttemptOutcome.DONE, "promoted", by=by)
            return TaskState.DONE if ok else None
        if outcome is AttemptOutcome.CANCELLED:
            target = TaskState.CANCELLED
        elif final:
            target = TaskState.FAILED
        elif outcome.counts_against_budget:
            events = alog.read_events(self.layout.attempts_log(claim.task_id))
            failures = alog.failures_before(events, claim.attempt) + 1
            envelope = self.read_envelope(claim.task_id)
            target = TaskState.FAILED if failures >= envelope.max_attempts else TaskState.QUEUED
        else:
            target = TaskState.QUEUED
        ok = self._move_claim(claim, target, outcome, reason, by=by)
        return target if ok else None

    def _move_claim(
        self,
        claim: ClaimName,
        target: TaskState,
        outcome: AttemptOutcome,
        reason: str | None,
        *,
        by: str = "agent",
    ) -> bool:
        check_transition(TaskState.CLAIMED, target)
        if target is TaskState.QUEUED:
            dest = self.layout.queue_path(claim.queue.next_attempt())
        else:
            dest = self.layout.terminal_path(claim.task_id, target.value, claim.attempt)
        try:
            # CLAIMED -> target: the fence. Only the holder of the claim file can move it.
            os.rename(self.layout.claim_path(claim), dest)
        except FileNotFoundError:
            if by == "agent":
                alog.log_event(
                    self.layout.attempts_log(claim.task_id),
                    "end",
                    n=claim.attempt,
                    outcome=AttemptOutcome.SUPERSEDED.value,
                    reason=f"finished as {outcome.value} after its claim was taken away",
                    agent=claim.agent_id,
                    by=by,
                )
            return False
        fields: dict[str, Any] = {"n": claim.attempt, "outcome": outcome.value, "by": by}
        if reason:
            fields["reason"] = reason
        fields["agent"] = claim.agent_id
        alog.log_event(self.layout.attempts_log(claim.task_id), "end", **fields)
        log.info(
            "task %s attempt %d: claimed -> %s (%s)",
            claim.task_id,
            claim.attempt,
            target.value,
            outcome.value,
            extra={"task_id": claim.task_id, "attempt": claim.attempt, "agent": claim.agent_id},
        )
        return True

    # ------------------------------------------------------------------ operator side

    def cancel(self, task_id: str) -> Location:
        """Cancel a queued or running task. Raises ``StateConflict`` if it already ended."""
        for _ in range(10):  # the token may move under us (claimed, requeued): look again
            loc = self.locate(task_id)
            if loc.state is TaskState.QUEUED and loc.queue is not None:
                dest = self.layout.terminal_path(task_id, "cancelled", loc.attempt)
                check_transition(TaskState.QUEUED, TaskState.CANCELLED)
                try:
                    os.rename(loc.path, dest)  # QUEUED -> CANCELLED
                except FileNotFoundError:
                    continue
                alog.log_event(self.layout.attempts_log(task_id), "cancel", n=loc.attempt)
                return Location(TaskState.CANCELLED, dest, loc.attempt)
            if loc.state is TaskState.CLAIMED and loc.claim is not None:
                state = self.end_attempt(
                    loc.claim, AttemptOutcome.CANCELLED, "cancelled by the operator", by="cli"
                )
                if state is None:
                    continue
                # The agent notices its claim is gone at its next heartbeat and stops the work.
                return self.locate(task_id)
            raise StateConflict(f"task {task_id} is {loc.state.value}; nothing to cancel")
        raise SpoolError(f"task {task_id} kept moving; try again")

    def retry(self, task_id: str) -> Location:
        """Queue an ended task again as a new attempt, with a fresh attempt budget."""
        loc = self.locate(task_id)
        if not loc.state.terminal:
            raise StateConflict(f"task {task_id} is {loc.state.value}; only ended tasks retry")
        envelope = self.read_envelope(task_id)
        name = self.queue_name(envelope, loc.attempt + 1)
        check_transition(loc.state, TaskState.QUEUED)
        try:
            os.rename(loc.path, self.layout.queue_path(name))  # DONE/FAILED/CANCELLED -> QUEUED
        except FileNotFoundError as exc:
            raise StateConflict(f"task {task_id} changed state; try again") from exc
        alog.log_event(self.layout.attempts_log(task_id), "retry", after=loc.attempt)
        return Location(TaskState.QUEUED, self.layout.queue_path(name), name.attempt, queue=name)

    def write_reason(self, path: Path, reason: str) -> None:
        atomic_write(path, reason.encode("utf-8") + b"\n")
