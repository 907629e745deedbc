"""Directory change notification without delay (watchdog's raw inotify wrapper on Linux).

watchdog's observer buffers moved-from events for half a second, which would delay every later
event in a directory that files are moved out of (the queue, tasks.d). We use its unbuffered
``InotifyFD`` instead and hand each event's file name to a callback in the watcher's thread.
Elsewhere there is no watcher and callers rely on their periodic rescans.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OnName = Callable[[str, str], None]  # (file name, "create" | "moved" | "close_write")


class _Callback:
    def __init__(self, on_name: OnName, on_overflow: Callable[[], None]) -> None:
        self._on_name = on_name
        self._on_overflow = on_overflow
        self.closing = False

    def on_event(self, event: Any) -> None:
        if event.name and not event.is_directory:
            if event.is_close_write:
                kind = "close_write"
            elif event.is_moved_to:
                kind = "moved"
            else:
                kind = "create"
            self._on_name(event.name.decode("utf-8", "surrogateescape"), kind)

    def on_watch_deleted(self, wd: Any) -> None:
        if not self.closing:  # closing the watcher removes its watch too: not news
            log.warning("watched directory disappeared (wd %s)", wd)

    def on_queue_overflow(self) -> None:
        self._on_overflow()


class DirectoryWatcher:
    """Calls ``on_name(name, kind)`` from a background thread for new entries.

    Reports creations, moves into the directory and (with ``close_write``) files closed after
    writing. ``on_overflow`` is called when the kernel dropped events: rescan then.
    """

    def __init__(
        self,
        path: Path,
        on_name: OnName,
        on_overflow: Callable[[], None],
        *,
        close_write: bool = False,
    ) -> None:
        self._fd: Any = None
        if not sys.platform.startswith("linux"):
            return
        from watchdog.observers.inotify_c import InotifyConstants as C
        from watchdog.observers.inotify_c import InotifyFD

        mask = C.IN_CREATE | C.IN_MOVED_TO | C.IN_ONLYDIR | C.IN_DONT_FOLLOW
        if close_write:
            mask |= C.IN_CLOSE_WRITE
        self._fd = InotifyFD()
        self._callback = _Callback(on_name, on_overflow)
        self._fd.add_callback(bytes(path), mask, self._callback, "coordinator")
        self._fd.start()

    @property
    def active(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        if self._fd is not None:
            self._callback.closing = True
            self._fd.stop()
            self._fd = None
