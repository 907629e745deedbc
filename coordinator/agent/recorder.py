"""Buffer what an agent has to tell the database and write it in batches, off the event loop.

The database is a record, not the truth: a failed write is logged and dropped (``coordinator db
rebuild`` restores the record from the spool); it never fails or delays a task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from coordinator.errors import CoordinatorError
from coordinator.models import AttemptRecord
from coordinator.states import TaskState
from coordinator.store import Store

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.2


class Recorder:
    """Queues record calls; :meth:`flush` applies them in one transaction."""

    def __init__(self, db_path: Path) -> None:
        self._db_path = db_path
        self._store: Store | None = None
        self._pending: list[Callable[[Store], None]] = []
        self._lock = threading.Lock()  # guards _pending
        self._write_lock = threading.Lock()  # one flush at a time

    def attempt(
        self,
        task_id: str,
        record: AttemptRecord,
        state: TaskState,
        reason: str | None = None,
    ) -> None:
        def apply(store: Store) -> None:
            store.record_attempt(task_id, record)
            store.record_state(task_id, state, reason)

        self._add(apply)

    def agent(self, agent_id: str, spec: str, pid: int, state: str) -> None:
        now = time.time()

        def apply(store: Store) -> None:
            store.record_agent(agent_id, spec, pid, socket.gethostname(), now, state)

        self._add(apply)

    def _add(self, apply: Callable[[Store], None]) -> None:
        with self._lock:
            self._pending.append(apply)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        with self._write_lock:
            try:
                if self._store is None:
                    self._store = Store(self._db_path)
                with self._store.batch():
                    for apply in pending:
                        apply(self._store)
            except (CoordinatorError, OSError) as exc:
                log.warning("could not record %d change(s) in %s: %s (pid %d)",
                            len(pending), self._db_path, exc, os.getpid())

    async def flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            if self._pending:
                await asyncio.to_thread(self.flush)

    def close(self) -> None:
        with self._write_lock:
            if self._store is not None:
                self._store.close()
                self._store = None
