"""The systemd units pass `systemd-analyze verify`, and sd_notify reaches a real socket.

The units are verified from a copy in ``tmp_path`` so systemd never looks at this checkout's other
files, with ``--man=no`` (whether man pages are installed is a property of the host, not of the
units). ``verify`` checks that the first word of ``ExecStart=`` is an executable: as shipped that is
``/usr/bin/env``, which exists on every systemd host, and ``coordinator`` itself is looked up on
``PATH`` only when the unit starts; the documented virtualenv variant
(``/opt/coordinator/venv/bin/coordinator``) is verified too, with ``ExecStart=`` rewritten in the
copy to a fake ``coordinator`` script in ``tmp_path``, because ``/opt`` is not ours to write.

Without `systemd-analyze` the verify tests skip on a laptop and fail under CI (``CI=true``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from coordinator.config import ENV_PREFIX, Settings, load_settings
from coordinator.daemon import sdnotify

UNITS_DIR = Path(__file__).resolve().parents[2] / "systemd"
DAEMON_UNIT = "coordinator.service"
AGENT_TEMPLATE = "coordinator-agent@.service"
AGENT_INSTANCE = "coordinator-agent@echo.service"
RECV_TIMEOUT = 5.0  # seconds a test waits for a datagram that should already be queued

# Lines about the machine running the test, not about the units: the service user does not exist
# on a build host, and some CI containers have no running systemd or bus. Everything else fails.
ENVIRONMENT_LINES = [
    re.compile(
        r"\b(user|group)\b.*\b(unknown|not found|does not exist|failed to resolve|no such)\b",
        re.IGNORECASE,
    ),
    re.compile(r"\b(unknown|failed to resolve|no such) (user|group)\b", re.IGNORECASE),
    re.compile(r"System has not been booted with systemd"),
    re.compile(r"Failed to connect to (system scope )?bus"),
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@pytest.fixture
def systemd_analyze() -> str:
    """The `systemd-analyze` binary; missing, it skips the test locally and fails it in CI."""
    path = shutil.which("systemd-analyze")
    if path is None:
        message = "systemd-analyze is not installed (apt-get install systemd)"
        if _in_ci():
            pytest.fail(f"{message}; it is required under CI=true")
        pytest.skip(message)
    return path


def _systemd_version(analyze: str) -> int:
    out = subprocess.run(
        [analyze, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, f"unexpected `systemd-analyze --version` output: {out!r}"
    return int(match.group(1))


def _is_environmental(line: str, unit_dir: Path) -> bool:
    if any(pattern.search(line) for pattern in ENVIRONMENT_LINES):
        return True
    # A warning about one of the host's own units (a dependency such as network-online.target),
    # reported with its path: not ours to fix.
    match = re.match(r"(/\S+?):\d+:", line)
    return match is not None and not Path(match.group(1)).is_relative_to(unit_dir)


def verify(analyze: str, unit_dir: Path, *names: str) -> tuple[list[str], list[str]]:
    """Run `systemd-analyze verify` on ``names`` in ``unit_dir``: (problems, environmental lines).

    Any output line that is not about the environment is a problem, warnings included: systemd
    only warns about an unknown key or an unparsable value and then ignores it, which for a
    hardening option means the protection silently does not exist.
    """
    args = [analyze, "verify", "--man=no"]
    if _systemd_version(analyze) >= 250:
        # Judge our units only, not errors in the host's units they pull in (systemd >= 250).
        args.append("--recursive-errors=no")
    args += [str(unit_dir / name) for name in names]
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LC_ALL": "C",
        "SYSTEMD_COLORS": "0",
        "SYSTEMD_PAGER": "cat",
        "SYSTEMD_LOG_LEVEL": "notice",
    }
    proc = subprocess.run(
        args, capture_output=True, text=True, env=env, cwd=unit_dir, timeout=60, check=False
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    environmental = [line for line in lines if _is_environmental(line, unit_dir)]
    problems = [line for line in lines if line not in environmental]
    # A failure explained only by environmental lines is ignored with them; a silent one is not.
    if proc.returncode != 0 and not lines:
        problems.append(f"systemd-analyze verify exited {proc.returncode} without saying why")
    return problems, environmental


def _copy_units(tmp_path: Path) -> Path:
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for name in (DAEMON_UNIT, AGENT_TEMPLATE):
        shutil.copy2(UNITS_DIR / name, unit_dir / name)
    return unit_dir


def _unit_settings(name: str) -> dict[tuple[str, str], list[str]]:
    """Parse a unit file into (section, key) -> values; repeated keys (Environment=) accumulate."""
    settings: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in (UNITS_DIR / name).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault((section, key.strip()), []).append(value.strip())
    return settings


def _unit_environment(name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in _unit_settings(name).get(("Service", "Environment"), []):
        for assignment in value.split():
            key, _, val = assignment.partition("=")
            env[key] = val
    return env


# --- systemd-analyze verify ----------------------------------------------------------------------


def test_daemon_unit_verifies(systemd_analyze: str, tmp_path: Path) -> None:
    unit_dir = _copy_units(tmp_path)
    problems, _ = verify(systemd_analyze, unit_dir, DAEMON_UNIT)
    assert problems == []


def test_agent_template_instance_verifies(systemd_analyze: str, tmp_path: Path) -> None:
    # A template cannot be verified by itself meaningfully (%i is empty); an instance name makes
    # systemd load coordinator-agent@.service from the same directory and expand the specifiers.
    unit_dir = _copy_units(tmp_path)
    problems, _ = verify(systemd_analyze, unit_dir, AGENT_INSTANCE)
    assert problems == []


def test_virtualenv_execstart_variant_verifies(systemd_analyze: str, tmp_path: Path) -> None:
    """The drop-in the units document (ExecStart= the venv's script) gives valid units too."""
    unit_dir = _copy_units(tmp_path)
    fake = tmp_path / "venv" / "bin" / "coordinator"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    fake.chmod(0o755)
    for name in (DAEMON_UNIT, AGENT_TEMPLATE):
        path = unit_dir / name
        text = path.read_text(encoding="utf-8")
        rewritten = re.sub(
            r"^ExecStart=/usr/bin/env coordinator ", f"ExecStart={fake} ", text, flags=re.MULTILINE
        )
        assert rewritten != text, f"{name}: no `ExecStart=/usr/bin/env coordinator` line"
        path.write_text(rewritten, encoding="utf-8")
    problems, _ = verify(systemd_analyze, unit_dir, DAEMON_UNIT, AGENT_INSTANCE)
    assert problems == []


def test_verify_reports_a_broken_unit(systemd_analyze: str, tmp_path: Path) -> None:
    """Negative control: a misspelt hardening key and a missing binary are caught, not filtered."""
    unit_dir = _copy_units(tmp_path)
    path = unit_dir / DAEMON_UNIT
    text = path.read_text(encoding="utf-8")
    text = text.replace("ProtectHome=yes", "ProtectHomes=yes")
    text = text.replace("ExecStart=/usr/bin/env ", f"ExecStart={tmp_path}/missing/env ")
    path.write_text(text, encoding="utf-8")
    problems, _ = verify(systemd_analyze, unit_dir, DAEMON_UNIT)
    joined = "\n".join(problems)
    assert "ProtectHomes" in joined
    assert "missing/env" in joined


# --- what the units promise (read from the files, no systemd needed) ------------------------------


@pytest.mark.parametrize(
    ("unit", "key", "value"),
    [
        (DAEMON_UNIT, "Type", "notify"),
        (DAEMON_UNIT, "NotifyAccess", "main"),
        (DAEMON_UNIT, "ExecStart", "/usr/bin/env coordinator run"),
        (DAEMON_UNIT, "WatchdogSec", "30"),
        (DAEMON_UNIT, "KillMode", "mixed"),
        (DAEMON_UNIT, "TimeoutStopSec", "60"),
        (AGENT_TEMPLATE, "Type", "simple"),
        (
            AGENT_TEMPLATE,
            "ExecStart",
            "/usr/bin/env coordinator agent --spec /etc/coordinator/agents/%i.toml",
        ),
        (AGENT_TEMPLATE, "KillMode", "control-group"),
    ],
)
def test_unit_keeps_its_contract(unit: str, key: str, value: str) -> None:
    assert _unit_settings(unit).get(("Service", key)) == [value]


def test_daemon_stop_timeout_covers_its_grace_periods() -> None:
    # systemd must not SIGKILL the daemon while it is still inside its own shutdown grace.
    defaults = Settings()
    timeout = float(_unit_settings(DAEMON_UNIT)[("Service", "TimeoutStopSec")][0])
    assert timeout > defaults.shutdown_grace + defaults.kill_grace


def test_units_share_environment_and_hardening() -> None:
    daemon, agent = _unit_settings(DAEMON_UNIT), _unit_settings(AGENT_TEMPLATE)
    shared = {k: v for k, v in daemon.items() if k[0] == "Service"}
    for key in ("Type", "NotifyAccess", "ExecStart", "WatchdogSec", "KillMode"):
        shared.pop(("Service", key), None)
    assert {k: agent.get(k) for k in shared} == shared


def test_unit_environment_names_real_settings(tmp_path: Path) -> None:
    """A misspelt COORDINATOR_* name would be ignored silently; each one must be a setting."""
    env = _unit_environment(DAEMON_UNIT)
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {ENV_PREFIX + "CONFIG"}
    assert env.keys() <= known
    # The config file does not exist here; load the rest exactly as the daemon would.
    env.pop(ENV_PREFIX + "CONFIG")
    settings = load_settings(environ=env)
    assert settings.home == Path("/var/lib/coordinator")
    assert settings.agents_path == Path("/etc/coordinator/agents")
    assert settings.tasks_path == Path("/var/spool/coordinator/tasks.d")
    assert settings.spool_path == Path("/var/spool/coordinator/spool")
    assert settings.db_file == Path("/var/lib/coordinator/coordinator.db")
    # tasks.d and the spool share a parent, hence (see docs/deployment.md) one file system.
    assert settings.tasks_path.parent == settings.spool_path.parent


# --- sd_notify against a real datagram socket -----------------------------------------------------


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, unless it is too long for a sockaddr_un path (108 bytes on Linux)."""
    if len(os.fsencode(tmp_path / "notify.sock")) < 100:
        yield tmp_path
        return
    short = Path(tempfile.mkdtemp(prefix="coord-"))  # under $TMPDIR, usually /tmp: short enough
    try:
        yield short
    finally:
        shutil.rmtree(short)


@pytest.fixture
def receiver(socket_dir: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A bound AF_UNIX datagram socket standing in for systemd, and the environ naming it."""
    path = socket_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fsencode(path))
        sock.settimeout(RECV_TIMEOUT)
        yield sock, {"NOTIFY_SOCKET": str(path)}


def test_notify_sends_exact_datagrams(receiver: tuple[socket.socket, dict[str, str]]) -> None:
    sock, environ = receiver
    assert sdnotify.ready(environ) is True
    assert sock.recv(4096) == b"READY=1"
    assert sdnotify.status("intake: 3 queued, 2 running", environ) is True
    assert sock.recv(4096) == b"STATUS=intake: 3 queued, 2 running"
    assert sdnotify.watchdog_ping(environ) is True
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.stopping(environ) is True
    assert sock.recv(4096) == b"STOPPING=1"
    assert sdnotify.notify("STATUS=ok\nEXTEND_TIMEOUT_USEC=5000000", environ) is True
    assert sock.recv(4096) == b"STATUS=ok\nEXTEND_TIMEOUT_USEC=5000000"


def test_status_cannot_inject_assignments(receiver: tuple[socket.socket, dict[str, str]]) -> None:
    sock, environ = receiver
    assert sdnotify.status("draining\nREADY=1", environ) is True
    assert sock.recv(4096) == b"STATUS=draining READY=1"
    assert sdnotify.status("agents: ünïcode ok", environ) is True
    assert sock.recv(4096) == "STATUS=agents: ünïcode ok".encode()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_notify_abstract_socket() -> None:
    name = f"fleet-coordinator-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(RECV_TIMEOUT)
        environ = {"NOTIFY_SOCKET": "@" + name}
        assert sdnotify.ready(environ) is True
        assert sock.recv(4096) == b"READY=1"
        assert sdnotify.watchdog_ping(environ) is True
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_explicit_environ_wins_over_process_environment(
    receiver: tuple[socket.socket, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    sock, environ = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "not-this-one.sock"))
    assert sdnotify.ready(environ) is True
    assert sock.recv(4096) == b"READY=1"


def test_default_environ_is_the_process_environment(
    receiver: tuple[socket.socket, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, environ = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", environ["NOTIFY_SOCKET"])
    assert sdnotify.ready() is True
    assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_notify_without_socket_is_a_no_op(environ: Mapping[str, str]) -> None:
    assert sdnotify.ready(environ) is False
    assert sdnotify.status("x", environ) is False
    assert sdnotify.watchdog_ping(environ) is False
    assert sdnotify.stopping(environ) is False


def test_notify_failures_return_false_and_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert sdnotify.ready({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")}) is False
    assert sdnotify.ready({"NOTIFY_SOCKET": "relative.sock"}) is False
    assert len([r for r in caplog.records if r.name == sdnotify.__name__]) == 2


def test_notify_rejects_an_empty_state(receiver: tuple[socket.socket, dict[str, str]]) -> None:
    _, environ = receiver
    with pytest.raises(ValueError, match="empty"):
        sdnotify.notify("", environ)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux datagram queue semantics")
def test_notify_does_not_block_forever_on_a_full_queue(
    receiver: tuple[socket.socket, dict[str, str]],
) -> None:
    """A receiver that stopped reading (wedged systemd) costs one bounded send, not a hang."""
    sock, environ = receiver
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.setblocking(False)
        for _ in range(100_000):
            try:
                filler.sendto(b"X" * 1024, sock.getsockname())
            except BlockingIOError:
                break
        else:
            pytest.fail("the receive queue never filled up")
        assert sdnotify.watchdog_ping(environ) is False


# --- watchdog_interval ------------------------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "500000"}) == 0.25


def test_watchdog_interval_honours_watchdog_pid() -> None:
    ours = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert sdnotify.watchdog_interval(ours) == 15.0
    # Inherited from a supervised parent: not meant for this process.
    theirs = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getppid())}
    assert sdnotify.watchdog_interval(theirs) is None


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "thirty"},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"},
        {"WATCHDOG_PID": "1"},
    ],
)
def test_watchdog_interval_off(environ: Mapping[str, str]) -> None:
    assert sdnotify.watchdog_interval(environ) is None


def test_watchdog_interval_defaults_to_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 2.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdnotify.watchdog_interval() is None
