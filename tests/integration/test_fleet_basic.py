"""End to end on one host: real daemon, real agent processes, the echo and command backends."""

from __future__ import annotations

import json
import sys
from typing import Any

from coordinator.states import TaskState
from tests.support import Home, wait_until


def test_dropped_tasks_run_and_show_their_output(home: Home) -> None:
    home.echo_spec(processes=2, concurrency=2)
    home.start_daemon()
    home.wait_daemon_ready()
    for i in range(6):
        home.drop(f"t{i}.toml", f'prompt = "hello number {i}"\npriority = {i}\n')
    for i in range(6):
        home.wait_state(f"t{i}", TaskState.DONE)
    shown = home.cli_json("show", "t3")
    assert shown["state"] == "done"
    assert shown["output"] == "hello number 3"
    assert shown["priority"] == 3
    assert [a["outcome"] for a in shown["attempts"]] == ["done"]
    assert set(shown["attempts"][0]) >= {"number", "agent", "pid", "started_at", "ended_at",
                                          "outcome"}
    status = home.cli("status", "--json")
    assert status.returncode == 0
    report = json.loads(status.stdout)
    assert report["daemon"]["running"] is True
    assert {a["state"] for a in report["agents"]} <= {"idle", "busy"}
    assert len([a for a in report["agents"] if a["alive"]]) == 2
    assert report["counts"]["done"] >= 6


def test_status_exits_3_without_daemon(home: Home) -> None:
    result = home.cli("status")
    assert result.returncode == 3
    assert b"NOT running" in result.stdout


def test_submit_show_cancel_retry(home: Home) -> None:
    home.command_spec("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    home.start_daemon()
    home.wait_daemon_ready()
    out = home.cli("submit", "--prompt", "wait a while", "--id", "long-one", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["id"] == "long-one"
    home.wait_state("long-one", TaskState.CLAIMED)
    cancelled = home.cli("cancel", "long-one")
    assert cancelled.returncode == 0, cancelled.stderr
    home.wait_state("long-one", TaskState.CANCELLED)
    again = home.cli("cancel", "long-one")
    assert again.returncode == 4
    retried = home.cli("retry", "long-one", "--json")
    assert retried.returncode == 0
    assert json.loads(retried.stdout)["attempt"] == 2
    home.wait_state("long-one", TaskState.CLAIMED)
    assert home.cli("retry", "long-one").returncode == 4


def test_invalid_submit_is_refused_with_exit_2(home: Home) -> None:
    bad = home.root / "bad.toml"
    bad.write_text('prompt = ""\n')
    result = home.cli("submit", str(bad))
    assert result.returncode == 2
    assert b"prompt" in result.stderr
    assert list(home.tasks.iterdir()) == []


def test_failing_command_fails_after_max_attempts_with_causes(home: Home) -> None:
    home.command_spec("failer", [sys.executable, "-c",
                                 "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    home.start_daemon()
    home.wait_daemon_ready()
    home.drop("doomed.toml", 'prompt = "x"\nmax_attempts = 2\n')
    home.wait_state("doomed", TaskState.FAILED)
    shown = home.cli_json("show", "doomed")
    assert [a["outcome"] for a in shown["attempts"]] == ["failed", "failed"]
    assert "exited with status 3: boom" in shown["reason"]


def test_sigterm_stops_daemon_and_agents_cleanly(home: Home) -> None:
    home.echo_spec(processes=2)
    daemon = home.start_daemon()
    home.wait_daemon_ready()
    def two_agents() -> dict[str, Any] | None:
        report = home.cli_json("status")
        return report if len(report["agents"]) == 2 else None

    report = wait_until(two_agents, 20, "two agents up")
    pids = [a["pid"] for a in report["agents"]]
    daemon.terminate()
    assert daemon.wait(timeout=20) == 0
    import psutil

    wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                               for p in pids), 10, "agents gone")
    assert home.cli("status").returncode == 3


def test_same_file_dropped_again_is_rejected_not_silently_dropped(home: Home) -> None:
    home.echo_spec()
    home.start_daemon()
    home.wait_daemon_ready()
    home.drop("twice.toml", 'prompt = "only once"\n')
    home.wait_state("twice", TaskState.DONE)
    home.drop("twice.toml", 'prompt = "only once"\n')  # the very same bytes, a new file
    reasons = home.spool.layout.rejected

    def rejected_reason() -> str | None:
        found = [p for p in reasons.glob("*.reason") if "twice.toml" in p.name]
        return found[0].read_text() if found else None

    reason = wait_until(rejected_reason, 20, "the second drop to be rejected")
    assert "already exists" in reason
    assert "coordinator retry twice" in reason
    assert [a["outcome"] for a in home.cli_json("show", "twice")["attempts"]] == ["done"]
