"""The database schema as an ordered list of migrations, tracked by ``PRAGMA user_version``.

Migration ``i`` (0-based) takes a database from version ``i`` to ``i + 1``. Each one runs in its
own ``BEGIN IMMEDIATE`` transaction together with the ``user_version`` bump, so a crash leaves the
database at the old version or the new one, never between; several processes opening a new
database at once apply each migration exactly once. Append new migrations; never edit one that
has shipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from coordinator.errors import StoreError
from coordinator.store.connection import immediate

log = logging.getLogger(__name__)

Migration = Callable[[Any], None]  # receives the sqlite_utils.Database inside the transaction


def _initial(db: Any) -> None:
    """Tasks, attempts, events, agents and rejected files."""
    statements = (
        # One row per accepted task; ``agent`` is the spec filter the task asked for (who may
        # take it), the agent that ran an attempt is in ``attempts``. ``attempts`` counts the
        # attempts started so far. ``labels`` is a JSON object.
        """CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            priority INTEGER,
            agent TEXT,
            seq INTEGER,
            source TEXT,
            accepted_at REAL,
            updated_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER,
            reason TEXT,
            labels TEXT NOT NULL DEFAULT '{}'
        )""",
        "CREATE INDEX tasks_by_state ON tasks (state, priority, seq)",
        """CREATE TABLE attempts (
            task_id TEXT NOT NULL,
            number INTEGER NOT NULL,
            agent TEXT,
            pid INTEGER,
            started_at REAL,
            ended_at REAL,
            outcome TEXT NOT NULL,
            reason TEXT,
            PRIMARY KEY (task_id, number)
        )""",
        # History: rows are only ever appended (the triggers refuse the rest), and a rebuild
        # keeps them. ``data`` is a JSON object or NULL.
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            task_id TEXT,
            attempt INTEGER,
            agent TEXT,
            data TEXT
        )""",
        "CREATE INDEX events_by_task ON events (task_id, id)",
        """CREATE TRIGGER events_no_update BEFORE UPDATE ON events
           BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
        """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
           BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
        """CREATE TABLE agents (
            id TEXT PRIMARY KEY,
            spec TEXT,
            pid INTEGER,
            host TEXT,
            started_at REAL,
            last_seen REAL,
            state TEXT
        )""",
        # ``name`` is the file name as dropped; ``file`` its stamped name under rejected/.
        """CREATE TABLE rejected (
            name TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            at REAL NOT NULL,
            task_id TEXT,
            file TEXT
        )""",
        "CREATE INDEX rejected_by_task ON rejected (task_id)",
    )
    for sql in statements:
        db.execute(sql)


MIGRATIONS: tuple[Migration, ...] = (_initial,)
SCHEMA_VERSION = len(MIGRATIONS)


def user_version(db: Any) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: Any, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the database up to ``len(migrations)``; return the version it is now at.

    Idempotent and safe to run from many processes at once: the version is read again inside
    each write transaction, so a migration another process applied meanwhile is not applied
    twice. A failing migration rolls back with its version bump and its error propagates.
    Raises ``StoreError`` if the database is newer than this code (downgrades are refused).
    ``sqlite3.Error`` is left for the caller to translate.
    """
    target = len(migrations)
    # A plain read first: an up-to-date database (the common case) costs no write lock, so
    # opening a store never queues behind a long write transaction of another process.
    current = user_version(db)
    while True:
        if current > target:
            raise StoreError(
                f"the database is at schema version {current}, newer than this coordinator "
                f"({target}); upgrade the coordinator or rebuild the database"
            )
        if current == target:
            return current
        with immediate(db):
            current = user_version(db)
            if current >= target:
                continue  # another process migrated between our read and our lock
            migrations[current](db)
            # PRAGMA takes no parameters; the value is an int we computed.
            db.execute(f"PRAGMA user_version = {current + 1}")
        log.info("store: migrated the database to schema version %d", current + 1)
        current += 1
