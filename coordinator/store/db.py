"""``Store``: the SQLite record of tasks, attempts, events, agents and rejected files.

The spool is the truth about a task's state; this database records what happened and answers
queries fast. Anything in ``tasks``, ``attempts`` and ``rejected`` can be rebuilt from the spool
(:func:`coordinator.store.rebuild.rebuild`); ``events`` and ``agents`` are history only it holds.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from coordinator.errors import StoreError
from coordinator.models import AttemptRecord, TaskEnvelope
from coordinator.states import TaskState
from coordinator.store.connection import DEFAULT_BUSY_TIMEOUT, connect, immediate, translated
from coordinator.store.schema import migrate

_JSON_COLUMNS = ("labels", "data")


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its JSON columns turned back into objects."""
    for column in _JSON_COLUMNS:
        value = row.get(column)
        if isinstance(value, str):
            row[column] = json.loads(value)
    return row


class Store:
    """One connection to the coordinator's database; opened (created, migrated) on construction.

    Guarantees: every public write is one transaction (or part of the caller's :meth:`batch`);
    writes take the lock with ``BEGIN IMMEDIATE`` and wait up to ``busy_timeout`` seconds for
    it, so many processes can write at once without "database is locked" failures; every
    ``sqlite3`` error surfaces as ``StoreError`` with the original as its ``__cause__``.
    Not guaranteed: thread safety (a ``Store`` may move between threads, e.g. with
    ``asyncio.to_thread``, but only one may use it at a time), or that the record agrees with
    the spool (it is written after the spool moves; :func:`rebuild` realigns it).
    """

    def __init__(self, path: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = path
        try:
            self._db = connect(path, busy_timeout)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the database {path}: {exc}") from exc
        try:
            with translated("migrating the schema", path):
                migrate(self._db)
        except BaseException:
            self._db.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the connection. Idempotent; any later call raises ``StoreError``."""
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def batch(self) -> Iterator[Self]:
        """Group every record made inside the block into one transaction.

        All of them are committed together when the block ends, or none if it raises (the
        exception propagates unchanged). Nested batches join the outer one as savepoints.
        Other connections see none of the batch's writes until it commits.
        """
        with translated("a batch", self.path), immediate(self._db):
            yield self

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[Any]:
        with translated(what, self.path):
            nested = self._db.conn.in_transaction  # a closed connection raises here, translated
        if nested:
            # Inside the caller's batch: no savepoint per record (it cost a random name and two
            # statements each on the agents' hot path). A failing record fails the whole batch.
            with translated(what, self.path):
                yield self._db
            return
        with translated(what, self.path), immediate(self._db) as db:
            yield db

    def _query(self, what: str, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with translated(what, self.path):
            return [_decoded(dict(row)) for row in self._db.query(sql, params)]

    # ------------------------------------------------------------------ records

    def record_accepted(self, envelope: TaskEnvelope) -> None:
        """Record an accepted task as queued; recording it again keeps its state and attempts."""
        task = envelope.task
        with self._write("recording an accepted task") as db:
            db.execute(
                """INSERT INTO tasks (id, state, priority, agent, seq, source, accepted_at,
                                      updated_at, attempts, max_attempts, reason, labels)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, NULL, ?)
                   ON CONFLICT (id) DO UPDATE SET
                       priority = excluded.priority, agent = excluded.agent,
                       seq = excluded.seq, source = excluded.source,
                       accepted_at = excluded.accepted_at, max_attempts = excluded.max_attempts,
                       labels = excluded.labels""",
                (
                    task.id,
                    TaskState.QUEUED.value,
                    task.priority,
                    task.agent,
                    envelope.seq,
                    envelope.source,
                    envelope.accepted_at,
                    envelope.accepted_at,
                    envelope.max_attempts,
                    json.dumps(task.labels, sort_keys=True),
                ),
            )

    def record_state(
        self,
        task_id: str,
        state: TaskState,
        reason: str | None = None,
        *,
        at: float | None = None,
    ) -> None:
        """Record a task's new state and why (``reason`` replaces the previous one).

        The store does not check the edge: the spool already made the move. A task the record
        has never seen (the database was lost or is newer than the task) gets a row with only
        its id and state, so status still counts it; a rebuild fills in the rest.
        """
        now = time.time() if at is None else at
        with self._write("recording a task state") as db:
            db.execute(
                """INSERT INTO tasks (id, state, updated_at, reason) VALUES (?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET
                       state = excluded.state, updated_at = excluded.updated_at,
                       reason = excluded.reason""",
                (task_id, TaskState(state).value, now, reason),
            )

    def record_attempt(self, task_id: str, record: AttemptRecord) -> None:
        """Insert or replace attempt ``record.number`` of a task; raise the task's attempt count."""
        # Plain SQL, not sqlite-utils' upsert: this runs once per attempt on the agents' hot
        # path and upsert introspects the table's schema on every call.
        with self._write("recording an attempt") as db:
            db.execute(
                """INSERT INTO attempts (task_id, number, agent, pid, started_at, ended_at,
                                         outcome, reason)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (task_id, number) DO UPDATE SET
                       agent = excluded.agent, pid = excluded.pid,
                       started_at = excluded.started_at, ended_at = excluded.ended_at,
                       outcome = excluded.outcome, reason = excluded.reason""",
                (task_id, record.number, record.agent, record.pid, record.started_at,
                 record.ended_at, record.outcome.value, record.reason),
            )
            db.execute(
                "UPDATE tasks SET attempts = max(attempts, ?) WHERE id = ?",
                (record.number, task_id),
            )

    def record_event(
        self,
        kind: str,
        *,
        task_id: str | None = None,
        attempt: int | None = None,
        agent: str | None = None,
        data: dict[str, Any] | None = None,
        at: float | None = None,
    ) -> int:
        """Append one event to the history; return its id (ids grow in commit order)."""
        row = {
            "at": time.time() if at is None else at,
            "kind": kind,
            "task_id": task_id,
            "attempt": attempt,
            "agent": agent,
            "data": None if data is None else json.dumps(data, sort_keys=True),
        }
        with self._write("recording an event") as db:
            return int(db["events"].insert(row).last_rowid)

    def record_agent(
        self,
        agent_id: str,
        spec: str,
        pid: int | None,
        host: str,
        started_at: float,
        state: str,
    ) -> None:
        """Insert or replace an agent process's row; its ``last_seen`` becomes now."""
        row = {
            "id": agent_id,
            "spec": spec,
            "pid": pid,
            "host": host,
            "started_at": started_at,
            "last_seen": time.time(),
            "state": state,
        }
        with self._write("recording an agent") as db:
            db["agents"].upsert(row, pk="id")

    def touch_agent(self, agent_id: str, state: str | None = None) -> bool:
        """Set an agent's ``last_seen`` to now (and its state, if given); False if unknown."""
        with self._write("touching an agent") as db:
            cursor = db.execute(
                "UPDATE agents SET last_seen = ?, state = coalesce(?, state) WHERE id = ?",
                (time.time(), state, agent_id),
            )
            return bool(cursor.rowcount)

    def record_rejected(
        self,
        name: str,
        reason: str,
        at: float,
        task_id: str | None = None,
        *,
        file: str | None = None,
    ) -> None:
        """Record a rejected task file (latest rejection of a name wins).

        ``name`` is the file name as dropped, ``file`` its stamped name under ``rejected/``.
        A rejected file never became a task, so no ``tasks`` row changes, even if ``task_id``
        is the id of an accepted task.
        """
        row = {"name": name, "reason": reason, "at": at, "task_id": task_id, "file": file}
        with self._write("recording a rejected file") as db:
            db["rejected"].upsert(row, pk="name")

    def clear_rebuildable(self) -> None:
        """Delete every task, attempt and rejected row (the part a rebuild restores)."""
        with self._write("clearing the record") as db:
            for table in ("tasks", "attempts", "rejected"):
                db.execute(f"DELETE FROM {table}")

    # ------------------------------------------------------------------ queries

    def counts_by_state(self) -> dict[str, int]:
        """Tasks per state, every ``TaskState`` present (0 if none); ``rejected`` counts files."""
        counts = {state.value: 0 for state in TaskState}
        rows = self._query(
            "counting tasks",
            """SELECT state, count(*) AS n FROM tasks GROUP BY state
               UNION ALL SELECT 'rejected', count(*) FROM rejected""",
        )
        for row in rows:
            counts[row["state"]] = counts.get(row["state"], 0) + int(row["n"])
        return counts

    def list_tasks(
        self, state: TaskState | str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Tasks in claim order (priority, then arrival), optionally only those in ``state``."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        where, params = ("", ()) if state is None else ("WHERE state = ?", (str(state),))
        return self._query(
            "listing tasks",
            f"SELECT * FROM tasks {where} ORDER BY priority, seq, id LIMIT ?",
            (*params, limit),
        )

    def get_task(self, task_id: str) -> dict[str, Any] | None:
        """The task's row, or None if the record does not know it."""
        rows = self._query("reading a task", "SELECT * FROM tasks WHERE id = ?", (task_id,))
        return rows[0] if rows else None

    def attempts_for(self, task_id: str) -> list[dict[str, Any]]:
        """The task's attempts, first to last."""
        return self._query(
            "reading attempts",
            "SELECT * FROM attempts WHERE task_id = ? ORDER BY number",
            (task_id,),
        )

    def events_for(self, task_id: str) -> list[dict[str, Any]]:
        """The task's events in the order they were recorded."""
        return self._query(
            "reading events", "SELECT * FROM events WHERE task_id = ? ORDER BY id", (task_id,)
        )

    def list_agents(self) -> list[dict[str, Any]]:
        """Every agent the record has seen, by id."""
        return self._query("listing agents", "SELECT * FROM agents ORDER BY id")

    def list_rejected(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Rejected files, newest first."""
        return self._query(
            "listing rejected files", "SELECT * FROM rejected ORDER BY at DESC LIMIT ?", (limit,)
        )

    def find_rejected(self, name_or_id: str) -> dict[str, Any] | None:
        """The latest rejection of a file by its name, its stamped name, or its task id."""
        rows = self._query(
            "finding a rejected file",
            """SELECT * FROM rejected WHERE name = ? OR file = ? OR task_id = ?
               ORDER BY at DESC LIMIT 1""",
            (name_or_id, name_or_id, name_or_id),
        )
        return rows[0] if rows else None
