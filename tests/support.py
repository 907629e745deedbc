"""Shared test helpers: wait for conditions, run real daemons and agents in a temporary home."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil

from coordinator.config import Settings, load_settings
from coordinator.spool.filespool import FileSpool
from coordinator.spool.layout import SpoolLayout
from coordinator.states import TaskState

T = TypeVar("T")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.1)


ECHO_SPEC = """\
backend = "echo"
processes = {processes}
concurrency = {concurrency}

[backend_options]
token_delay_ms = {delay}
"""

COMMAND_SPEC = """\
backend = "command"
processes = {processes}
concurrency = {concurrency}

[backend_options]
argv = {argv}
kill_grace = 1.0
"""


class Home:
    """A deployment in a temporary directory, with helpers to run real processes against it."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.root = root
        self.agents = root / "agents"
        self.tasks = root / "tasks.d"
        self.agents.mkdir(parents=True, exist_ok=True)
        self.tasks.mkdir(parents=True, exist_ok=True)
        defaults: dict[str, Any] = {
            "heartbeat_interval": 0.2,
            "reap_interval": 0.2,
            "stall_timeout": 5.0,
            "kill_grace": 1.0,
            "shutdown_grace": 5.0,
            "rescan_interval": 0.5,
            "settle_timeout": 3.0,
            "restart_backoff": 0.2,
        }
        defaults.update(settings)
        lines = [f"{k} = {json.dumps(v)}" for k, v in defaults.items()]
        (root / "coordinator.toml").write_text("\n".join(lines) + "\n")
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def settings(self) -> Settings:
        return load_settings(self.root, environ={})

    @property
    def spool(self) -> FileSpool:
        return FileSpool(SpoolLayout(self.settings.spool_path).ensure())

    def echo_spec(self, name: str = "echo", processes: int = 1, concurrency: int = 1,
                  delay: float = 0.0) -> Path:
        path = self.agents / f"{name}.toml"
        path.write_text(ECHO_SPEC.format(processes=processes, concurrency=concurrency,
                                         delay=delay))
        return path

    def command_spec(self, name: str, argv: list[str], processes: int = 1,
                     concurrency: int = 1, extra: str = "") -> Path:
        path = self.agents / f"{name}.toml"
        path.write_text(COMMAND_SPEC.format(processes=processes, concurrency=concurrency,
                                            argv=json.dumps(argv)) + extra)
        return path

    def drop(self, name: str, content: str | bytes) -> Path:
        """Write elsewhere, then rename into tasks.d (the documented way)."""
        data = content.encode() if isinstance(content, str) else content
        tmp = self.root / f".drop-{name}"
        tmp.write_bytes(data)
        final = self.tasks / name
        os.rename(tmp, final)
        return final

    def cli(self, *args: str, check: bool = False, timeout: float = 30.0,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "coordinator", "--home", str(self.root), *args],
            capture_output=True, timeout=timeout, check=check, input=input,
            env=clean_env(),
        )

    def cli_json(self, *args: str) -> Any:
        out = self.cli(*args, "--json")
        return json.loads(out.stdout)

    def start_daemon(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.root / "daemon.log", "ab")  # noqa: SIM115 - closed in stop_all
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "--home", str(self.root), "run", *args],
            stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
        )
        log.close()
        self.procs.append(proc)
        return proc

    def start_agent(self, spec: Path, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.root / "agent.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "--home", str(self.root), "agent",
             "--spec", str(spec), *args],
            stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
        )
        log.close()
        self.procs.append(proc)
        return proc

    def state(self, task_id: str) -> TaskState | None:
        try:
            return self.spool.locate(task_id).state
        except Exception:
            return None

    def wait_state(self, task_id: str, state: TaskState, timeout: float = 20.0) -> None:
        wait_until(lambda: self.state(task_id) is state, timeout, f"{task_id} {state}")

    def wait_daemon_ready(self, timeout: float = 20.0) -> None:
        wait_until(lambda: self.cli("status").returncode == 0, timeout, "daemon running")

    def log_text(self) -> str:
        parts = []
        for name in ("daemon.log", "agent.log"):
            path = self.root / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        kill_strays(self.root)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("COORDINATOR_") and k not in ("NOTIFY_SOCKET",)}
    return env


def kill_strays(root: Path) -> list[int]:
    """Kill any process still running whose command line mentions ``root``; return their pids."""
    found = []
    marker = str(root)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.pid != os.getpid() and any(marker in part for part in cmdline):
                found.append(proc.pid)
                proc.kill()
        except psutil.Error:
            continue
    return found


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for an absent reaper counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
    return members
