"""Helpers shared by the benchmarks: the machine, child processes, RSS sampling, statistics.

Nothing here knows about the coordinator or its peers; the scenario modules use it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict[str, Any]:
    """What the numbers were measured on (goes into every report)."""
    model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "memory_gb": round(mem / 2**30, 1),
        "filesystem": _fs_type(Path(os.environ.get("TMPDIR", "/tmp"))),
        "git": _git_state(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _fs_type(path: Path) -> str:
    best, fstype = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path.resolve()).startswith(parts[1]) and \
                    len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def _git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                             check=False)
        return out.stdout

    # Only changes to the product count: bench/ and tests/ do not change what is measured.
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "coordinator",
                                      "pyproject.toml").splitlines() if line]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "?", "dirty": dirty}


def child_env() -> dict[str, str]:
    """The environment for children: no COORDINATOR_* leaking in, the repo importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("COORDINATOR_") and k != "NOTIFY_SOCKET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


class Procs:
    """Every child process a scenario started; :meth:`stop_all` ends exactly those."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], log: Path, *, stdin: bool = False,
              stdout: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as log_file:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=stdout if stdout is not None else log_file,
                stderr=log_file,
                env=child_env(),
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30.0,
             sig: int = signal.SIGTERM) -> tuple[int, float | None]:
        """Signal ``proc`` (if it still runs) and reap it: (exit code, CPU seconds used)."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)  # still our unreaped child: the pid cannot be reused
        try:
            return reap(proc, timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            return reap(proc, 30.0)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                self.stop(proc, timeout=15.0)
        self.procs.clear()


USAGE: dict[int, tuple[float, float]] = {}  # pid -> (user, system) CPU seconds at exit


def reap(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float | None]:
    """Wait for ``proc`` with ``wait4``: its exit code and the CPU seconds (user + system) it
    and the children it waited for used (the split is kept in ``USAGE``). Raises
    ``subprocess.TimeoutExpired``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere (Popen.poll): no usage to report
            return proc.wait(), None
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            USAGE[pid] = (usage.ru_utime, usage.ru_stime)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.01)


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) a live process has used so far."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def go(procs: Sequence[subprocess.Popen[bytes]]) -> float:
    """Release children waiting on their stdin (see ``bench.launch``); returns the time."""
    now = time.time()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
    return now


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class RssSampler:
    """Samples the resident set size of named processes (and their children) in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._targets: dict[str, tuple[psutil.Process, bool]] = {}
        self.peak: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, label: str, pid: int, *, with_children: bool = False) -> None:
        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            return
        with self._lock:
            self._targets[label] = (proc, with_children)

    def sample(self, label: str) -> int:
        """RSS of ``label`` now (sum over its processes), in bytes; also updates the peak."""
        with self._lock:
            target = self._targets.get(label)
        if target is None:
            return 0
        root, with_children = target
        procs = [root]
        if with_children:
            with contextlib.suppress(psutil.Error):
                procs += root.children(recursive=True)
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        if total:
            with self._lock:
                self.last[label] = total
                self.peak[label] = max(self.peak.get(label, 0), total)
        return total

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                labels = list(self._targets)
            for label in labels:
                self.sample(label)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of ``values`` (nearest-rank), or empty if there are none."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(p: float) -> float:
        index = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
        return ordered[index]

    return {
        "n": len(ordered),
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def in_ms(seconds: Sequence[float]) -> dict[str, float]:
    """:func:`percentiles` of durations given in seconds, reported in milliseconds."""
    return {k: v if k == "n" else v * 1000.0 for k, v in percentiles(seconds).items()}


def median_by(runs: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose ``key`` is the median (the lower one of an even count)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def python() -> str:
    return sys.executable
