"""Many OS processes write one database at once: nobody fails, nothing is lost.

Each worker is a real Python process with its own connection. They wait at a start gate (their
stdin) until every one of them is ready, then all open the same *new* database file (so they
also race to create it and apply the migrations) and write hundreds of records, alone and in
batches, while reading in between.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path

from coordinator.store import SCHEMA_VERSION, Store

WORKERS = 10
TASKS_PER_WORKER = 200
BATCH = 20

WORKER = """
import json, os, sys, time
from pathlib import Path
from coordinator.models import AttemptRecord, Task, TaskEnvelope
from coordinator.states import AttemptOutcome, TaskState
from coordinator.store import Store

path, worker, tasks, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("ready", flush=True)
sys.stdin.readline()  # the start gate: every worker is released at the same moment
with Store(path) as store:
    store.record_agent(f"w{worker}", "echo", os.getpid(), "localhost", time.time(), "running")
    ids = [f"w{worker}-{i}" for i in range(tasks)]
    for i, task_id in enumerate(ids):
        store.record_accepted(TaskEnvelope(
            task=Task(id=task_id, prompt="p", priority=i % 7),
            seq=worker * 1_000_000 + i, accepted_at=time.time(), source=f"{task_id}.toml",
            source_sha256="0" * 64, max_attempts=3,
        ))
        store.record_event("accepted", task_id=task_id, agent=f"w{worker}",
                           data={"worker": worker, "i": i})
        if i % 50 == 0:
            store.counts_by_state()
    for start in range(0, tasks, batch):
        with store.batch():  # one transaction per group of completions, as agents do
            for task_id in ids[start:start + batch]:
                store.record_attempt(task_id, AttemptRecord(
                    number=1, agent=f"w{worker}", pid=os.getpid(), started_at=time.time(),
                    ended_at=time.time(), outcome=AttemptOutcome.DONE))
                store.record_state(task_id, TaskState.DONE)
                store.record_event("done", task_id=task_id, attempt=1, agent=f"w{worker}")
        store.touch_agent(f"w{worker}")
print("finished", flush=True)
"""


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def run_workers(db_path: Path) -> list[tuple[int, str, str]]:
    """Start every worker, release them together, and return (returncode, stdout, stderr)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(db_path), str(k), str(TASKS_PER_WORKER), str(BATCH)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(WORKERS)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=100)
            results.append((proc.returncode, out, err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_many_processes_write_at_once_without_lock_errors(tmp_path: Path) -> None:
    db_path = tmp_path / "coordinator.db"
    results = run_workers(db_path)

    for k, (code, out, err) in enumerate(results):
        assert "database is locked" not in err, f"worker {k}: {err}"
        assert (code, out.strip(), err) == (0, "finished", ""), f"worker {k}"

    total = WORKERS * TASKS_PER_WORKER
    with Store(db_path) as store:
        counts = store.counts_by_state()
        assert counts["done"] == total
        assert sum(counts.values()) == total
        tasks = store.list_tasks(limit=total + 1)
        assert {t["id"] for t in tasks} == {
            f"w{k}-{i}" for k in range(WORKERS) for i in range(TASKS_PER_WORKER)
        }
        assert all(t["attempts"] == 1 for t in tasks)
        agents = store.list_agents()
        assert sorted(a["id"] for a in agents) == sorted(f"w{k}" for k in range(WORKERS))
        sample = store.events_for("w3-17")
        assert [e["kind"] for e in sample] == ["accepted", "done"]

    with raw(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM attempts").fetchone()[0] == total
        kinds = dict(conn.execute("SELECT kind, count(*) FROM events GROUP BY kind").fetchall())
        assert kinds == {"accepted": total, "done": total}
        accepted = conn.execute(
            "SELECT json_extract(data, '$.worker'), json_extract(data, '$.i') FROM events "
            "WHERE kind = 'accepted' ORDER BY id"
        ).fetchall()
    assert set(accepted) == {(k, i) for k in range(WORKERS) for i in range(TASKS_PER_WORKER)}
    # Each worker's own events are in its program order ...
    for k in range(WORKERS):
        assert [i for w, i in accepted if w == k] == list(range(TASKS_PER_WORKER))
    # ... and the workers really ran at the same time: their writes interleave rather than
    # arriving as one block per worker (which is what a serialised test would produce).
    runs = sum(1 for _ in groupby(w for w, _ in accepted))
    assert runs > WORKERS
