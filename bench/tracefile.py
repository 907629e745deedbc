"""Fixed-width trace lines the Huey peer's workers append per task (start, complete).

Kept apart from ``bench.huey_app`` so the benchmark can read traces without building a Huey
(which would create its database in the current directory).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

LINE = "{kind} {index:09d} {at:17.6f}\n"  # fixed width: line count = file size / LINE_SIZE
LINE_SIZE = len(LINE.format(kind="s", index=0, at=time.time()))


class TraceWriter:
    """Appends lines to ``BASE/KIND-PID.trace``; a forked worker opens its own files."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._fds: dict[str, int] = {}
        self._pid = 0

    def write(self, kind: str, index: int) -> None:
        if self._pid != os.getpid():
            self._fds.clear()
            self._pid = os.getpid()
        fd = self._fds.get(kind)
        if fd is None:
            path = self.base / f"{kind}-{os.getpid()}.trace"
            fd = self._fds[kind] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, LINE.format(kind=kind, index=index, at=time.time()).encode())


def read_trace(base: Path, kind: str) -> list[tuple[int, float]]:
    """Every (index, time) line of every worker's ``kind`` trace ("s" start, "c" complete)."""
    out = []
    for path in base.glob(f"{kind}-*.trace"):
        for line in path.read_text().splitlines():
            _, index, at = line.split()
            out.append((int(index), float(at)))
    return out


def trace_count(base: Path, kind: str) -> int:
    return sum(p.stat().st_size for p in base.glob(f"{kind}-*.trace")) // LINE_SIZE
