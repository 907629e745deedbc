"""An agent's in-memory view of the queue, kept fresh by directory events, never by re-listing.

Listing a queue of 100k tokens costs tens of milliseconds, so an agent lists once at start (and
after the kernel dropped events), then learns of every new token from inotify. Entries may be
stale (another agent took the task): the claim rename then fails and the agent takes the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os

from coordinator.spool.layout import QueueName, SpoolLayout
from coordinator.spool.watch import DirectoryWatcher


class QueueIndex:
    """Queue tokens this agent may claim, most urgent first. Use from one event loop."""

    def __init__(self, layout: SpoolLayout, spec_name: str) -> None:
        self.layout = layout
        self.spec_name = spec_name
        self._heap: list[tuple[tuple[int, int, str], int, str]] = []
        self._known: set[str] = set()
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._watcher: DirectoryWatcher | None = None

    def start(self) -> None:
        # Watch before listing, so a token created in between is seen by one or the other.
        self._watcher = DirectoryWatcher(
            self.layout.queue, self._on_name_threadsafe, self._on_overflow_threadsafe
        )
        self.refresh()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    @property
    def watching(self) -> bool:
        return self._watcher is not None and self._watcher.active

    def refresh(self) -> None:
        """Re-list the queue (at start, after an overflow, and as an idle safety net)."""
        for name in os.listdir(self.layout.queue):
            self.add(name)

    def add(self, name: str) -> None:
        if name in self._known:
            return
        parsed = QueueName.parse(name)
        if parsed is None or not parsed.accepts(self.spec_name):
            return
        self._known.add(name)
        heapq.heappush(self._heap, (parsed.sort_key, parsed.attempt, name))
        self._changed.set()

    def pop(self) -> QueueName | None:
        """The most urgent known token (which may already be gone), or None."""
        while self._heap:
            _, _, name = heapq.heappop(self._heap)
            self._known.discard(name)
            parsed = QueueName.parse(name)
            if parsed is not None:
                return parsed
        return None

    def __len__(self) -> int:
        return len(self._heap)

    async def wait(self, timeout: float) -> None:
        """Wait until a token may have arrived, or ``timeout`` passed."""
        self._changed.clear()
        if self._heap:
            return
        with contextlib.suppress(TimeoutError):
            # asyncio.timeout, not wait_for: wait_for can swallow a cancellation (gh-86296).
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    def _on_name_threadsafe(self, name: str, _kind: str) -> None:
        self._loop.call_soon_threadsafe(self.add, name)

    def _on_overflow_threadsafe(self) -> None:
        self._loop.call_soon_threadsafe(self.refresh)
