"""Intake: turn files dropped into ``tasks.d/`` into queued tasks, or reject them with a reason.

Safety rules, each one closing a way to lose or corrupt work:
- never follow a symlink, never open a FIFO or device (``lstat`` then ``O_NOFOLLOW|O_NONBLOCK``
  and an inode check, so a file swapped between the two is caught);
- never read a file half-written: a file is taken when its writer closed it (inotify close-write)
  or renamed it into place, or on a rescan once its size and mtime held still between two looks;
  a file that keeps changing past ``settle_timeout`` is rejected;
- a good file leaves ``tasks.d`` only after its task is durable (``FileSpool.accept``), by a
  rename into its task directory (kept as ``source.<ext>``); a bad one is renamed into
  ``rejected/`` after its ``.reason`` file is written. Nothing is deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.config import Settings
from coordinator.errors import TaskFileError
from coordinator.models import is_valid_name
from coordinator.spool.filespool import FileSpool, SeqClock, Submission
from coordinator.spool.fsutil import atomic_write
from coordinator.spool.watch import DirectoryWatcher
from coordinator.store import Store
from coordinator.taskfile import is_ignored, parse_task, sha256, split_name

log = logging.getLogger(__name__)

BATCH = 512
# A file neither closed after writing nor renamed in is taken only once its signature has held
# still for this long. "Equal at two looks" alone is not enough: two passes can run a
# millisecond apart (every event wakes the loop), which would read a file between two writes.
QUIET_PERIOD = 1.0
# The longest dropped name kept whole in a rejected/ name: the stamp, ".reason" and the
# atomic-write temporary around it must stay within the file system's 255-byte NAME_MAX.
MAX_SHOWN_NAME_BYTES = 160


@dataclass
class _Pending:
    first_seen: float
    signature: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) at the last look
    changed_at: float = 0.0  # when the signature was last seen to change (monotonic)
    ready: bool = False  # closed after writing or renamed in: take it now


@dataclass
class IntakeStats:
    accepted: int = 0
    rejected: int = 0
    deferred: int = 0
    last_batch_at: float | None = None
    recent_rejections: list[str] = field(default_factory=list)


class Intake:
    """Watches ``tasks_dir`` and feeds the spool. :meth:`process` runs in one thread at a time."""

    def __init__(
        self,
        settings: Settings,
        spool: FileSpool,
        store: Store | None,
        known_specs: set[str] | None = None,
    ) -> None:
        self.settings = settings
        self.known_specs = known_specs
        self.spool = spool
        self.store = store
        self.tasks_dir = settings.tasks_path
        self.clock = SeqClock(max((n.seq for n in spool.layout.list_queue()), default=0))
        self.stats = IntakeStats()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self.wakeup = threading.Event()
        self._watcher: DirectoryWatcher | None = None

    def start(self) -> None:
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        self._watcher = DirectoryWatcher(
            self.tasks_dir, self._on_event, self.rescan, close_write=True
        )
        self.rescan(initial=True)

    def run(self, stop: threading.Event) -> None:
        """The intake loop, in a thread of its own until ``stop`` is set.

        It blocks on the watcher's wake-up directly: one hand-off between a file landing in
        tasks.d and its examination (a loop on asyncio.to_thread made three).
        """
        last_rescan = time.monotonic()
        while not stop.is_set():
            woke = self.wakeup.wait(self.settings.rescan_interval)
            self.wakeup.clear()
            if stop.is_set():
                return
            if not woke or time.monotonic() - last_rescan >= self.settings.rescan_interval:
                self.rescan()
                last_rescan = time.monotonic()
            try:
                self.process()
            except Exception:
                log.exception("intake pass failed; will retry")

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    # Called from the watcher thread.
    def _on_event(self, name: str, kind: str) -> None:
        if is_ignored(name):
            return
        with self._lock:
            entry = self._pending.setdefault(name, _Pending(time.monotonic()))
            # A create alone may be a file still being written: wait for its close-write. A
            # moved-in file, or a close-write, is complete.
            if kind in ("close_write", "moved"):
                entry.ready = True
        self.wakeup.set()

    def rescan(self, initial: bool = False) -> None:
        """List ``tasks_dir``. At start-up, files quiet for QUIET_PERIOD are taken at once;
        one modified just now may still be written in place and waits like any other."""
        try:
            names = os.listdir(self.tasks_dir)
        except FileNotFoundError:
            return
        now = time.monotonic()
        with self._lock:
            for name in names:
                if is_ignored(name):
                    continue
                entry = self._pending.setdefault(name, _Pending(now))
                if initial and self._quiet(name):
                    entry.ready = True
        self.wakeup.set()

    def _quiet(self, name: str) -> bool:
        try:
            st = os.lstat(self.tasks_dir / name)
        except OSError:
            return False
        return time.time() - st.st_mtime >= QUIET_PERIOD

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def process(self) -> int:
        """Examine pending files; accept or reject those that are complete. Returns how many."""
        with self._lock:
            names = list(self._pending.items())
        submissions: list[tuple[str, Submission]] = []
        handled = 0
        for name, entry in names:
            try:
                sub = self._examine(name, entry)
            except Exception:
                # One file must not stop intake: an unexpected error here used to abort the
                # whole pass, so every later pass died on the same file and nothing else in
                # tasks.d was ever taken. The file stays where it is to be examined again.
                log.exception("examining %s failed; will look again", _shown(name))
                continue
            if sub is not None:
                submissions.append((name, sub))
            if len(submissions) >= BATCH:
                handled += self._accept(submissions)
                submissions = []
        handled += self._accept(submissions)
        return handled

    def _forget(self, name: str) -> None:
        with self._lock:
            self._pending.pop(name, None)

    def _examine(self, name: str, entry: _Pending) -> Submission | None:
        path = self.tasks_dir / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._forget(name)
            return None
        if stat.S_ISLNK(st.st_mode):
            self._reject(name, "it is a symbolic link; the daemon never follows links. Copy "
                         "the file itself into tasks.d.")
            return None
        if stat.S_ISDIR(st.st_mode):
            self._forget(name)  # directories are not tasks; leave them alone
            return None
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
            self._reject(name, f"it is {kind}; a task is a regular file.")
            return None
        if st.st_mode & 0o444 == 0:
            self._reject(name, "it has no read permission (mode "
                         f"{stat.filemode(st.st_mode)}); chmod u+r and drop it again.")
            return None
        if st.st_size > self.settings.max_task_bytes:
            self._reject(name, f"it is {st.st_size} bytes, over the limit of "
                         f"{self.settings.max_task_bytes}; shorten the prompt or raise "
                         "max_task_bytes in coordinator.toml.")
            return None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        # Found by a listing or a bare create: take it once it held still for QUIET_PERIOD.
        if not entry.ready:
            now = time.monotonic()
            if entry.signature != signature:
                entry.signature = signature
                entry.changed_at = now
                self._still_changing(name, entry)
                return None
            if now - entry.changed_at < QUIET_PERIOD:
                return None  # unchanged so far; a later pass (within rescan_interval) looks again
        data = self._read(name, path, st)
        if data is None:
            entry.ready = False  # it changed under us: wait for it to hold still
            self._still_changing(name, entry)
            return None
        try:
            task = parse_task(name, data, self.settings.max_prompt_chars)
        except TaskFileError as exc:
            self._reject(name, exc.message)
            return None
        max_attempts = task.max_attempts or self.settings.default_max_attempts
        if task.agent is not None and self.known_specs is not None \
                and task.agent not in self.known_specs:
            log.warning("task %s is for agent %r, which no spec in %s defines: it waits until "
                        "one does", task.id, task.agent, self.settings.agents_path)
        return Submission(task, name, sha256(data), max_attempts, source_inode=st.st_ino)

    def _still_changing(self, name: str, entry: _Pending) -> None:
        waited = time.monotonic() - entry.first_seen
        if waited > self.settings.settle_timeout:
            self._reject(name, f"the file was still being written after {waited:.0f}s. Write "
                         "it under another name (or outside tasks.d) and rename it into place.")
        else:
            self.stats.deferred += 1
        return None

    def _read(self, name: str, path: Path, before: os.stat_result) -> bytes | None:
        """Read the whole file; None if it changed while we read it."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except PermissionError:
            self._reject(name, "permission denied reading it; make it readable by the daemon's "
                         "user and drop it again.")
            return None
        except OSError:
            return None  # replaced by a link or removed between lstat and open: look again
        try:
            st = os.fstat(fd)
            if st.st_ino != before.st_ino or not stat.S_ISREG(st.st_mode):
                return None
            chunks = []
            remaining = self.settings.max_task_bytes + 1
            while remaining > 0 and (chunk := os.read(fd, min(remaining, 1 << 20))):
                chunks.append(chunk)
                remaining -= len(chunk)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            return None
        return b"".join(chunks)

    def _reject(self, name: str, reason: str) -> None:
        # The stamp holds no "-": the original name is everything after the first one.
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}"
        # The shown name, not the raw one, in the rejected name, the reason and the record:
        # a name that is not UTF-8 cannot be encoded into the reason or the database, and a
        # long one plus the stamp exceeds NAME_MAX; either used to raise here on every pass.
        shown = _shown(name)
        target = f"{stamp}-{shown}"
        rejected = self.spool.layout.rejected
        # Reason first, then the move: a crash in between leaves the file in tasks.d to be
        # examined again, never a rejected file without its reason.
        text = f"{shown}: {reason}\n".encode("utf-8", "backslashreplace")
        atomic_write(rejected / f"{target}.reason", text, fsync=False)
        try:
            os.rename(self.tasks_dir / name, rejected / target)
        except FileNotFoundError:
            os.unlink(rejected / f"{target}.reason")
            self._forget(name)
            return
        self._forget(name)
        self.stats.rejected += 1
        self.stats.recent_rejections = [*self.stats.recent_rejections[-19:], shown]
        log.warning("rejected %s: %s (moved to %s)", shown, reason, rejected / target)
        if self.store is not None:
            stem = split_name(name)[0]
            self.store.record_rejected(
                shown, reason, time.time(), stem if is_valid_name(stem) else None, file=target
            )

    def _accept(self, submissions: list[tuple[str, Submission]]) -> int:
        if not submissions:
            return 0
        outcomes = self.spool.accept([sub for _, sub in submissions], self.clock)
        accepted = []
        for (name, sub), outcome in zip(submissions, outcomes, strict=True):
            if outcome.duplicate_of_other:
                source = outcome.envelope.source if outcome.envelope else "?"
                self._reject(name, f"a different task with id {sub.task.id!r} already exists "
                             f"(from {source}); choose another id, or run "
                             f"'coordinator retry {sub.task.id}' to run that one again.")
                continue
            suffix = split_name(name)[1]
            dest = self.spool.layout.task_dir(sub.task.id) / f"source{suffix}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.tasks_dir / name, dest)  # the task is durable: keep the original
            self._forget(name)
            if outcome.queue is not None:
                accepted.append(outcome)
                log.info("accepted %s as task %s (priority %d)", name, sub.task.id,
                         sub.task.priority, extra={"task_id": sub.task.id})
        self.stats.accepted += len(accepted)
        self.stats.last_batch_at = time.time()
        if self.store is not None and accepted:
            with self.store.batch():
                for outcome in accepted:
                    if outcome.envelope is not None:
                        # record_accepted alone: it records a new task as QUEUED and keeps the
                        # state of a row that exists. The task is claimable since spool.accept,
                        # so an agent may already have recorded it CLAIMED or DONE; a
                        # record_state(QUEUED) here used to overwrite that, and status then
                        # counted a finished task as queued for good.
                        self.store.record_accepted(outcome.envelope)
        return len(submissions)


def _shown(name: str) -> str:
    """``name`` as printable UTF-8 (undecodable bytes as ``\\xff``), cut to fit a file name."""
    shown = os.fsencode(name).decode("utf-8", "backslashreplace")
    if len(shown.encode()) <= MAX_SHOWN_NAME_BYTES:
        return shown
    while len(shown.encode()) > MAX_SHOWN_NAME_BYTES - 3:
        shown = shown[:-1]
    return shown + "..."
