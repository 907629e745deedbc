"""Opening the database, translating its errors, and the one way to write: ``BEGIN IMMEDIATE``.

Many processes write the same file (the daemon and every agent), so each connection is set up
for concurrency: WAL journal (readers never block the writer and the writer never blocks
readers), ``synchronous=NORMAL`` (a commit is durable at the next checkpoint; the database is a
record that :func:`coordinator.store.rebuild.rebuild` can restore from the spool, so losing the
last commits to a power cut is acceptable, corrupting the file is not and WAL does not), and a
long busy timeout so a writer waits for the lock instead of failing with "database is locked".
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlite_utils

from coordinator.errors import StoreError

DEFAULT_BUSY_TIMEOUT = 30.0  # seconds a writer waits for the write lock before giving up


@contextlib.contextmanager
def translated(what: str, path: Path) -> Iterator[None]:
    """Turn any ``sqlite3.Error`` raised inside the block into ``StoreError`` (with its cause)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"{what} failed on {path}: {exc}") from exc


def connect(path: Path, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> Any:
    """Open (creating if needed) the database at ``path``; return a ``sqlite_utils.Database``.

    Raises ``sqlite3.Error`` or ``OSError``; the caller translates them. The connection is in
    driver autocommit mode (``isolation_level=None``): the driver never opens a transaction on
    its own, so every transaction is one this package began with :func:`immediate`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread=False: a Store is used from one thread at a time, but not always the
    # same one (asyncio.to_thread picks any pool thread); callers serialise access.
    conn = sqlite3.connect(
        str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        _enable_wal(conn, time.monotonic() + busy_timeout)
        conn.execute("PRAGMA synchronous = NORMAL")
        return sqlite_utils.Database(conn, execute_plugins=False)
    except BaseException:
        conn.close()
        raise


def _enable_wal(conn: sqlite3.Connection, deadline: float) -> None:
    """Put the database file in WAL mode (a no-op, and lock-free, once it is).

    The switch needs an exclusive lock, and SQLite does not wait for it with the busy handler:
    two processes that open a new database at once both hold a shared lock while asking for
    the exclusive one, so one of them gets "database is locked" at once instead of waiting.
    That race only exists while the file is new, so the loser retries until ``deadline``.
    """
    delay = 0.001
    while True:
        try:
            mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode != "wal":
                mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            continue
        if mode != "wal":
            raise sqlite3.OperationalError(
                f"cannot use WAL journal mode here (got {mode!r}); put the database on a "
                "local file system"
            )
        return


@contextlib.contextmanager
def immediate(db: Any) -> Iterator[Any]:
    """Run the block in one write transaction; nested blocks become savepoints.

    The outermost block starts with ``BEGIN IMMEDIATE``: it takes the write lock up front, so
    two writers never both hold read snapshots and then deadlock trying to upgrade them (the
    ``SQLITE_BUSY`` that no busy timeout can wait out). The block commits if it ends normally
    and rolls back if it raises; the exception propagates unchanged.
    """
    conn: sqlite3.Connection = db.conn
    if conn.in_transaction:
        with db.atomic():  # a savepoint: undo this block alone, leave the caller's batch
            yield db
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
