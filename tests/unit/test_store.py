"""The SQLite record: schema and migrations, each record and query, batches, rebuild."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.errors import SpoolError, StoreError
from coordinator.models import AttemptRecord, Task, TaskEnvelope
from coordinator.spool.filespool import FileSpool, SeqClock, Submission
from coordinator.spool.layout import ClaimName, SpoolLayout
from coordinator.states import AttemptOutcome, TaskState
from coordinator.store import SCHEMA_VERSION, Store, rebuild
from coordinator.store.connection import connect
from coordinator.store.rebuild import rejected_name
from coordinator.store.schema import MIGRATIONS, migrate, user_version


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "coordinator.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store(db_path) as opened:
        yield opened


def envelope(task_id: str, *, priority: int = 100, seq: int = 1, **task: Any) -> TaskEnvelope:
    return TaskEnvelope(
        task=Task(id=task_id, prompt=f"do {task_id}", priority=priority, **task),
        seq=seq,
        accepted_at=1000.0 + seq,
        source=f"{task_id}.toml",
        source_sha256="0" * 64,
        max_attempts=3,
    )


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to look at the file behind the Store's back."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def tables(path: Path) -> set[str]:
    with raw(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {row[0] for row in rows}


# ---------------------------------------------------------------------- schema and migrations


def test_open_creates_the_schema_in_wal_mode(store: Store, db_path: Path) -> None:
    assert {"tasks", "attempts", "events", "agents", "rejected"} <= tables(db_path)
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"tasks_by_state", "events_by_task"} <= indexes
    # Per-connection settings are only visible on the Store's own connection.
    conn = store._db.conn
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 30_000


def test_opening_twice_keeps_data_and_schema(db_path: Path) -> None:
    with Store(db_path) as first:
        first.record_accepted(envelope("a"))
        first.record_event("hello", task_id="a")
    with raw(db_path) as conn:
        schema_before = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    with Store(db_path) as second:
        assert second.get_task("a") is not None
        assert [e["kind"] for e in second.events_for("a")] == ["hello"]
    with raw(db_path) as conn:
        assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == (
            schema_before
        )
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_migrations_run_in_order_and_once(db_path: Path) -> None:
    applied: list[str] = []

    def second(db: Any) -> None:
        applied.append("second")
        db.execute("ALTER TABLE tasks ADD COLUMN note TEXT")

    Store(db_path).close()
    db = connect(db_path)
    try:
        assert migrate(db, [*MIGRATIONS, second]) == SCHEMA_VERSION + 1
        assert migrate(db, [*MIGRATIONS, second]) == SCHEMA_VERSION + 1
        assert user_version(db) == SCHEMA_VERSION + 1
        columns = {r[1] for r in db.execute("PRAGMA table_info(tasks)").fetchall()}
    finally:
        db.close()
    assert applied == ["second"]
    assert "note" in columns


def test_a_failing_migration_rolls_back_with_its_version(db_path: Path) -> None:
    def broken(db: Any) -> None:
        db.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("migration bug")

    Store(db_path).close()
    db = connect(db_path)
    try:
        with pytest.raises(RuntimeError, match="migration bug"):
            migrate(db, [*MIGRATIONS, broken])
        assert user_version(db) == SCHEMA_VERSION
        assert not db.conn.in_transaction
    finally:
        db.close()
    assert "half_done" not in tables(db_path)


def test_a_newer_database_is_refused(db_path: Path) -> None:
    Store(db_path).close()
    with raw(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    with pytest.raises(StoreError, match="newer than this coordinator"):
        Store(db_path)


def test_a_file_that_is_not_a_database_raises_store_error(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite, just text " * 100)
    with pytest.raises(StoreError) as info:
        Store(db_path)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_a_closed_store_raises_store_error(db_path: Path) -> None:
    opened = Store(db_path)
    opened.close()
    opened.close()  # idempotent
    with pytest.raises(StoreError):
        opened.get_task("a")
    with pytest.raises(StoreError):
        opened.record_event("late")


# ---------------------------------------------------------------------- records and queries


def test_record_accepted_then_again_keeps_progress(store: Store) -> None:
    store.record_accepted(envelope("a", priority=5, seq=7, agent="echo", labels={"team": "x"}))
    row = store.get_task("a")
    assert row == {
        "id": "a",
        "state": "queued",
        "priority": 5,
        "agent": "echo",
        "seq": 7,
        "source": "a.toml",
        "accepted_at": 1007.0,
        "updated_at": 1007.0,
        "attempts": 0,
        "max_attempts": 3,
        "reason": None,
        "labels": {"team": "x"},
    }
    store.record_state("a", TaskState.CLAIMED)
    store.record_attempt("a", AttemptRecord(number=1, agent="w1"))
    store.record_accepted(envelope("a", priority=5, seq=7, agent="echo"))  # a replayed intake
    again = store.get_task("a")
    assert again is not None
    assert (again["state"], again["attempts"], again["labels"]) == ("claimed", 1, {})
    assert store.get_task("missing") is None


def test_record_state_sets_state_reason_and_time(store: Store) -> None:
    store.record_accepted(envelope("a"))
    store.record_state("a", TaskState.FAILED, "backend exploded", at=2000.0)
    row = store.get_task("a")
    assert row is not None
    assert (row["state"], row["reason"], row["updated_at"]) == ("failed", "backend exploded", 2000)
    store.record_state("a", TaskState.QUEUED, at=2001.0)
    row = store.get_task("a")
    assert row is not None
    assert (row["state"], row["reason"], row["priority"]) == ("queued", None, 100)


def test_record_state_of_an_unknown_task_still_counts_it(store: Store) -> None:
    store.record_state("ghost", TaskState.DONE)
    row = store.get_task("ghost")
    assert row is not None
    assert (row["state"], row["priority"], row["labels"]) == ("done", None, {})
    assert store.counts_by_state()["done"] == 1


def test_record_attempt_upserts_and_counts(store: Store) -> None:
    store.record_accepted(envelope("a"))
    store.record_attempt("a", AttemptRecord(number=1, agent="w1", pid=11, started_at=5.0))
    store.record_attempt("a", AttemptRecord(number=2, agent="w2", pid=12, started_at=6.0))
    store.record_attempt(
        "a",
        AttemptRecord(
            number=1,
            agent="w1",
            pid=11,
            started_at=5.0,
            ended_at=5.5,
            outcome=AttemptOutcome.CRASHED,
            reason="killed",
        ),
    )
    assert store.attempts_for("a") == [
        {
            "task_id": "a",
            "number": 1,
            "agent": "w1",
            "pid": 11,
            "started_at": 5.0,
            "ended_at": 5.5,
            "outcome": "crashed",
            "reason": "killed",
        },
        {
            "task_id": "a",
            "number": 2,
            "agent": "w2",
            "pid": 12,
            "started_at": 6.0,
            "ended_at": None,
            "outcome": "running",
            "reason": None,
        },
    ]
    row = store.get_task("a")
    assert row is not None and row["attempts"] == 2  # an older attempt never lowers it
    assert store.attempts_for("b") == []


def test_events_are_appended_in_order_and_never_changed(store: Store, db_path: Path) -> None:
    first = store.record_event("claim", task_id="a", attempt=1, agent="w1", data={"n": 1})
    store.record_event("noise", task_id="b")
    second = store.record_event("done", task_id="a", attempt=1, agent="w1", at=42.0)
    assert first < second
    events = store.events_for("a")
    assert [(e["id"], e["kind"], e["data"]) for e in events] == [
        (first, "claim", {"n": 1}),
        (second, "done", None),
    ]
    assert events[1]["at"] == 42.0 and events[0]["agent"] == "w1"
    with raw(db_path) as conn:
        for sql in ("UPDATE events SET kind = 'x'", "DELETE FROM events"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(sql)


def test_agents_are_recorded_and_touched(store: Store) -> None:
    store.record_agent("echo-1", "echo", 123, "host-a", 10.0, "starting")
    (agent,) = store.list_agents()
    assert agent["last_seen"] is not None and agent["last_seen"] >= 10.0
    assert (agent["spec"], agent["pid"], agent["host"], agent["state"]) == (
        "echo",
        123,
        "host-a",
        "starting",
    )
    assert store.touch_agent("echo-1", "running") is True
    assert store.touch_agent("echo-1") is True
    assert store.list_agents()[0]["state"] == "running"
    assert store.touch_agent("nobody") is False
    store.record_agent("echo-1", "echo", 456, "host-a", 20.0, "starting")  # restarted
    assert [(a["pid"], a["started_at"]) for a in store.list_agents()] == [(456, 20.0)]


def test_rejected_files_are_found_by_name_file_or_id(store: Store) -> None:
    store.record_rejected("bad.toml", "TOML syntax error", 10.0, "bad", file="1-bad.toml")
    store.record_rejected("worse.json", "empty prompt", 11.0)
    assert store.find_rejected("bad.toml") == {
        "name": "bad.toml",
        "reason": "TOML syntax error",
        "at": 10.0,
        "task_id": "bad",
        "file": "1-bad.toml",
    }
    assert store.find_rejected("bad") == store.find_rejected("1-bad.toml")
    found = store.find_rejected("worse.json")
    assert found is not None and found["task_id"] is None
    store.record_rejected("bad.toml", "unknown field 'promt'", 12.0, "bad", file="2-bad.toml")
    latest = store.find_rejected("bad")
    assert latest is not None and latest["reason"] == "unknown field 'promt'"
    assert store.find_rejected("fine.toml") is None
    assert store.get_task("bad") is None  # a rejected file never became a task


def test_counts_by_state_reports_every_state(store: Store) -> None:
    assert store.counts_by_state() == {state.value: 0 for state in TaskState}
    for n, task_id in enumerate(["a", "b", "c", "d"]):
        store.record_accepted(envelope(task_id, seq=n))
    store.record_state("b", TaskState.CLAIMED)
    store.record_state("c", TaskState.DONE)
    store.record_state("d", TaskState.DONE)
    store.record_rejected("x.toml", "bad", 1.0)
    assert store.counts_by_state() == {
        "queued": 1,
        "claimed": 1,
        "done": 2,
        "failed": 0,
        "cancelled": 0,
        "rejected": 1,
    }


def test_list_tasks_in_claim_order_with_filter_and_limit(store: Store) -> None:
    store.record_accepted(envelope("late-urgent", priority=1, seq=9))
    store.record_accepted(envelope("early", priority=50, seq=1))
    store.record_accepted(envelope("second", priority=50, seq=2))
    store.record_accepted(envelope("lazy", priority=900, seq=0))
    store.record_state("second", TaskState.DONE)
    assert [t["id"] for t in store.list_tasks()] == ["late-urgent", "early", "second", "lazy"]
    assert [t["id"] for t in store.list_tasks(TaskState.QUEUED)] == [
        "late-urgent",
        "early",
        "lazy",
    ]
    assert [t["id"] for t in store.list_tasks("done")] == ["second"]
    assert [t["id"] for t in store.list_tasks(limit=2)] == ["late-urgent", "early"]
    assert store.list_tasks("failed") == []
    with pytest.raises(ValueError):
        store.list_tasks(limit=0)


# ---------------------------------------------------------------------- transactions


def test_batch_commits_everything_at_once(store: Store, db_path: Path) -> None:
    with Store(db_path) as other:
        with store.batch() as same:
            assert same is store
            store.record_accepted(envelope("a"))
            store.record_attempt("a", AttemptRecord(number=1, agent="w1"))
            store.record_event("claim", task_id="a")
            # Another connection sees nothing of an open batch (it is one transaction).
            assert other.get_task("a") is None
            assert other.events_for("a") == []
        assert other.get_task("a") is not None
        assert len(other.attempts_for("a")) == 1
        assert len(other.events_for("a")) == 1


def test_an_exception_in_a_batch_rolls_all_of_it_back(store: Store) -> None:
    store.record_accepted(envelope("kept"))

    class Boom(Exception):
        pass

    with pytest.raises(Boom), store.batch():
        store.record_accepted(envelope("a"))
        store.record_state("kept", TaskState.DONE)
        store.record_event("claim", task_id="a")
        raise Boom
    assert store.get_task("a") is None
    assert store.events_for("a") == []
    kept = store.get_task("kept")
    assert kept is not None and kept["state"] == "queued"
    store.record_event("after", task_id="a")  # the connection is usable again
    assert [e["kind"] for e in store.events_for("a")] == ["after"]


def test_a_nested_batch_that_fails_undoes_only_itself(store: Store) -> None:
    with store.batch():
        store.record_event("outer", task_id="a")
        with pytest.raises(KeyError), store.batch():
            store.record_event("inner", task_id="a")
            raise KeyError("x")
        store.record_event("outer-again", task_id="a")
    assert [e["kind"] for e in store.events_for("a")] == ["outer", "outer-again"]


def test_a_batch_holds_the_write_lock_from_its_start(store: Store, db_path: Path) -> None:
    # BEGIN IMMEDIATE: the lock is taken when the batch opens, before its first write, so two
    # writers never both hold read snapshots and deadlock upgrading them.
    with Store(db_path, busy_timeout=0.05) as impatient, store.batch():
        assert impatient.counts_by_state()["queued"] == 0  # readers are never blocked
        with pytest.raises(StoreError, match="locked") as info:
            impatient.record_event("blocked")
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    with Store(db_path, busy_timeout=0.05) as impatient:
        impatient.record_event("free", task_id="t")  # the lock went with the batch
        assert len(impatient.events_for("t")) == 1


# ---------------------------------------------------------------------- rebuild


@pytest.fixture
def spool(tmp_path: Path) -> FileSpool:
    return FileSpool(SpoolLayout(tmp_path / "spool").ensure())


def submit(spool: FileSpool, clock: SeqClock, task_id: str, *, max_attempts: int = 3) -> None:
    sub = Submission(
        task=Task(id=task_id, prompt=f"do {task_id}", labels={"id": task_id}),
        source=f"{task_id}.toml",
        source_sha256="f" * 64,
        max_attempts=max_attempts,
    )
    (accepted,) = spool.accept([sub], clock)
    assert accepted.queue is not None


def take(spool: FileSpool, task_id: str, agent: str, pid: int) -> ClaimName:
    (name,) = [n for n in spool.layout.list_queue() if n.task_id == task_id]
    claim = spool.claim(name, agent)
    assert claim is not None
    spool.start_attempt(claim, pid)
    return claim


def build_spool(spool: FileSpool) -> None:
    """One task in every state, a retried failure, and two rejected files."""
    clock = SeqClock()
    for task_id in ("queued", "running", "done", "retried", "failed", "cancelled"):
        submit(spool, clock, task_id, max_attempts=1 if task_id == "failed" else 3)
    take(spool, "running", "w1", 101)
    assert spool.complete_batch([(take(spool, "done", "w1", 101), {"output": "hi"})]) == [True]
    first = take(spool, "retried", "w2", 102)
    assert spool.end_attempt(first, AttemptOutcome.CRASHED, "w2 died", by="reaper") is (
        TaskState.QUEUED
    )
    last = take(spool, "failed", "w2", 102)
    assert spool.end_attempt(last, AttemptOutcome.FAILED, "backend 500", by="agent") is (
        TaskState.FAILED
    )
    spool.cancel("cancelled")
    rejected = spool.layout.rejected
    (rejected / "20250101T000000Z-bad.toml").write_text("prompt = ")
    spool.write_reason(rejected / "20250101T000000Z-bad.toml.reason", "TOML syntax error")
    (rejected / "20250102T000000Z-worse.json").write_text("[]")
    spool.write_reason(rejected / "20250102T000000Z-worse.json.reason", "not an object")
    # Leftovers that are not tasks: a crashed accept() without task.json, a hidden temp dir.
    (spool.layout.tasks / "half").mkdir()
    (spool.layout.tasks / ".tmp").mkdir()


def test_rebuild_restores_tasks_attempts_and_rejected_from_the_spool(
    store: Store, spool: FileSpool
) -> None:
    build_spool(spool)
    # A stale record: a task the spool never had, a wrong state, and some history.
    store.record_accepted(envelope("phantom"))
    store.record_state("done", TaskState.QUEUED)
    store.record_attempt("done", AttemptRecord(number=9, agent="nobody"))
    store.record_rejected("old.toml", "gone", 1.0)
    history = store.record_event("kept", task_id="done")

    counts = rebuild(store, spool)

    ids = ["queued", "running", "done", "retried", "failed", "cancelled"]
    assert counts == {
        "tasks": 6,
        "attempts": sum(len(store.attempts_for(task_id)) for task_id in ids),
        "rejected": 2,
        "skipped": 1,
    }
    assert counts["attempts"] >= 4
    states = {t["id"]: t["state"] for t in store.list_tasks()}
    assert states == {
        "queued": "queued",
        "running": "claimed",
        "done": "done",
        "retried": "queued",
        "failed": "failed",
        "cancelled": "cancelled",
    }
    done = store.get_task("done")
    assert done is not None
    assert (done["source"], done["labels"], done["attempts"], done["max_attempts"]) == (
        "done.toml",
        {"id": "done"},
        1,
        3,
    )
    assert [(a["number"], a["agent"], a["outcome"]) for a in store.attempts_for("done")] == [
        (1, "w1", "done")
    ]
    assert [(a["agent"], a["pid"], a["outcome"]) for a in store.attempts_for("running")] == [
        ("w1", 101, "running")
    ]
    assert [(a["outcome"], a["reason"]) for a in store.attempts_for("retried")] == [
        ("crashed", "w2 died")
    ]
    failed = store.get_task("failed")
    assert failed is not None and failed["reason"] == "backend 500"
    # The record mirrors the spool's own view of the attempt log, whatever it holds.
    assert [a["number"] for a in store.attempts_for("cancelled")] == [
        r.number for r in spool.attempts("cancelled")
    ]
    assert store.attempts_for("queued") == []
    assert store.get_task("phantom") is None and store.get_task("half") is None
    bad = store.find_rejected("bad.toml")
    assert bad is not None
    assert (bad["reason"], bad["file"]) == ("TOML syntax error", "20250101T000000Z-bad.toml")
    assert store.find_rejected("old.toml") is None
    assert [e["id"] for e in store.events_for("done")] == [history]
    assert store.counts_by_state()["rejected"] == 2


def test_rebuild_is_repeatable_and_logs_each_run(
    store: Store, spool: FileSpool, db_path: Path
) -> None:
    build_spool(spool)
    first = rebuild(store, spool)
    snapshot = (store.list_tasks(), [store.attempts_for(t["id"]) for t in store.list_tasks()])
    assert rebuild(store, spool) == first
    assert (store.list_tasks(), [store.attempts_for(t["id"]) for t in store.list_tasks()]) == (
        snapshot
    )
    with raw(db_path) as conn:
        rows = conn.execute("SELECT data FROM events WHERE kind = 'rebuild'").fetchall()
    assert len(rows) == 2


def test_rebuild_counts_a_claim_whose_start_is_not_logged_yet(
    store: Store, spool: FileSpool
) -> None:
    submit(spool, SeqClock(), "fresh")
    (name,) = spool.layout.list_queue()
    assert spool.claim(name, "w9") is not None  # claimed; the agent has not logged its start
    rebuild(store, spool)
    task = store.get_task("fresh")
    assert task is not None and (task["state"], task["attempts"]) == ("claimed", 1)
    assert [(a["agent"], a["outcome"]) for a in store.attempts_for("fresh")] == [("w9", "running")]


def test_rebuild_of_an_empty_spool_empties_the_record(store: Store, spool: FileSpool) -> None:
    store.record_accepted(envelope("a"))
    assert rebuild(store, spool) == {"tasks": 0, "attempts": 0, "rejected": 0, "skipped": 0}
    assert store.list_tasks() == []


def test_a_failed_rebuild_leaves_the_old_record(
    store: Store, spool: FileSpool, db_path: Path
) -> None:
    clock = SeqClock()
    submit(spool, clock, "new")
    store.record_accepted(envelope("old"))
    # The scan of rejected/ fails after the tasks were rebuilt inside the transaction.
    spool.layout.rejected.rmdir()
    spool.layout.rejected.write_text("not a directory")
    with pytest.raises(SpoolError, match="rejected"):
        rebuild(store, spool)
    assert [t["id"] for t in store.list_tasks()] == ["old"]
    with raw(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("file", "name"),
    [
        ("20250101T000000Z-bad.toml", "bad.toml"),
        ("1735689600123456-my-task.json", "my-task.json"),
        ("nostamp.toml", "nostamp.toml"),
        ("-odd", "-odd"),
    ],
)
def test_rejected_name_strips_the_stamp(file: str, name: str) -> None:
    assert rejected_name(file) == name
