"""Small, careful file-system helpers: atomic writes, directory fsync, syncfs."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from pathlib import Path

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if name:
            _libc = ctypes.CDLL(name, use_errno=True)
    return _libc


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creates, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush every dirty page and entry of the file system holding ``path`` (one call per batch).

    This is the group commit: write many files, then one ``syncfs`` makes them all durable at the
    price of one flush. Falls back to ``os.sync`` where ``syncfs`` is missing.
    """
    libc = _load_libc()
    func = getattr(libc, "syncfs", None) if libc is not None else None
    if func is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if func(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, fsync: bool) -> None:
    """Create ``path`` (which must not be in use) and write ``data`` to it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync, then rename over ``path``.

    A reader sees the old file or the whole new one, never a truncated one, even across a crash.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_file(tmp, data, fsync=fsync)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_line(path: Path, line: bytes) -> None:
    """Append one line with a single ``write`` on an ``O_APPEND`` descriptor.

    One ``write`` of a small buffer to an ``O_APPEND`` file is not interleaved with another
    process's, so an agent and a reaper can both log to the same attempt log.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, line if line.endswith(b"\n") else line + b"\n")
    finally:
        os.close(fd)
