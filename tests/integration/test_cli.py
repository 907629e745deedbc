"""The command line as scripts use it: --help everywhere, stable --json documents, exit codes,
submit options, ``db rebuild``. Real daemon and agent processes in a temporary home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import coordinator
import coordinator.cli  # registers every command on the group
from coordinator.cli.app import cli as root_group
from coordinator.states import TaskState
from tests.support import Home, clean_env, wait_until

PY = sys.executable

# A command-backend child that holds its task until the test creates release-<task id>.
HOLD_UNTIL_RELEASED = """
import os, sys, time
path = os.path.join(sys.argv[1], "release-" + os.environ["COORDINATOR_TASK_ID"])
while not os.path.exists(path):
    time.sleep(0.05)
sys.stdout.write("released")
"""

DOCUMENTED_COMMANDS = {
    ("run",), ("agent",), ("submit",), ("status",), ("tasks",), ("show",), ("cancel",),
    ("retry",), ("demo",), ("db",), ("db", "rebuild"),
}
REPORTING_COMMANDS = [("status",), ("tasks",), ("show",), ("cancel",), ("retry",), ("submit",),
                      ("db", "rebuild")]


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in sorted(group.commands.items()):
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += all_commands(command, (*prefix, name))
    return found


def coordinator_cmd(*args: str) -> list[str]:
    return [PY, "-m", "coordinator", *args]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    """One running daemon for the read-mostly tests: an echo agent and a holding command agent.

    Tests use their own task ids; tasks name their agent so neither spec takes the other's.
    """
    home = Home(tmp_path_factory.mktemp("cli") / "home", shutdown_grace=1.0)
    marks = home.root / "marks"
    marks.mkdir()
    home.echo_spec("echo", concurrency=2)
    home.command_spec("holder", [PY, "-c", HOLD_UNTIL_RELEASED, str(marks)], concurrency=4)
    try:
        home.start_daemon()
        home.wait_daemon_ready()
        home.drop("done-a.toml", 'prompt = "alpha beta"\npriority = 7\nagent = "echo"\n')
        home.drop("done-b.toml", 'prompt = "gamma"\nagent = "echo"\n')
        home.drop("broken.toml", 'prompt = "unterminated\n')
        home.wait_state("done-a", TaskState.DONE)
        home.wait_state("done-b", TaskState.DONE)
        wait_until(lambda: not home.tasks.joinpath("broken.toml").exists(), 20, "rejection")
        yield home
    finally:
        for task_id in ("held",):
            (marks / f"release-{task_id}").touch()
        home.stop_all()


def release(home: Home, task_id: str) -> None:
    (home.root / "marks" / f"release-{task_id}").touch()


# ---------------------------------------------------------------- help and version


def test_every_command_has_help() -> None:
    commands = all_commands(root_group)
    assert set(commands) >= DOCUMENTED_COMMANDS
    # In-process through the real command group (a dozen interpreters cost half a minute on a
    # small machine); the entry point itself is run as a process below and in test_version.
    runner = CliRunner()
    for cmd in commands:
        result = runner.invoke(root_group, [*cmd, "--help"], prog_name="coordinator")
        assert result.exit_code == 0, (cmd, result.output)
        assert result.output.startswith(f"Usage: coordinator {' '.join(cmd)} "), cmd
        assert result.output.count("\n") > 3, cmd  # a description, not just a usage line
        if cmd in REPORTING_COMMANDS:
            assert "--json" in result.output, cmd
    top = subprocess.run(coordinator_cmd("--help"), capture_output=True, timeout=60,
                         env=clean_env())
    assert top.returncode == 0, top.stderr
    text = top.stdout.decode()
    assert text.startswith("Usage: coordinator ")
    for (name,) in [c for c in commands if len(c) == 1]:
        assert f"  {name} " in text  # every command is listed in the top-level help
    short = subprocess.run(coordinator_cmd("status", "-h"), capture_output=True, timeout=60,
                           env=clean_env())
    assert short.returncode == 0 and short.stdout.startswith(b"Usage: coordinator status")


def test_version() -> None:
    result = subprocess.run(coordinator_cmd("--version"), capture_output=True, timeout=60,
                            env=clean_env())
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"coordinator, version {coordinator.__version__}"
    script = Path(PY).parent / "coordinator"  # the console script runs the same entry point
    if script.exists():
        same = subprocess.run([str(script), "--version"], capture_output=True, timeout=60,
                              env=clean_env())
        assert same.stdout == result.stdout


# ---------------------------------------------------------------- status


AGENT_KEYS = {"agent_id", "spec", "pid", "host", "alive", "state", "tasks", "heartbeat_age"}
STATUS_KEYS = {"home", "daemon", "slots", "agents", "running", "orphaned_claims", "counts",
               "pending_files"}


def test_status_json_schema(fleet: Home) -> None:
    fleet.cli("submit", "--prompt", "hold me", "--id", "held", "--agent", "holder", check=True)
    fleet.wait_state("held", TaskState.CLAIMED)

    def report_with_held() -> dict[str, Any] | None:
        result = fleet.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        report: dict[str, Any] = json.loads(result.stdout)
        return report if any(r["task_id"] == "held" for r in report["running"]) else None

    report = wait_until(report_with_held, 30, "held task in status")
    assert set(report) == STATUS_KEYS
    assert report["home"] == str(fleet.root)
    daemon = report["daemon"]
    assert set(daemon) == {"running", "pid", "started_at"}
    assert daemon["running"] is True
    assert isinstance(daemon["pid"], int) and daemon["pid"] == fleet.procs[0].pid
    assert isinstance(daemon["started_at"], float)
    assert time.time() - 600 < daemon["started_at"] <= time.time()

    assert set(report["slots"]) == {"echo", "holder"}
    for slots in report["slots"].values():
        assert [s["state"] for s in slots] == ["running"]
        assert set(slots[0]) >= {"slot", "state", "agent_id", "pid", "restarts", "last_exit"}

    agents = report["agents"]
    assert len(agents) == 2
    for agent in agents:
        assert set(agent) == AGENT_KEYS
        assert agent["alive"] is True
        assert isinstance(agent["pid"], int)
        assert isinstance(agent["heartbeat_age"], float) and agent["heartbeat_age"] >= 0
        assert isinstance(agent["host"], str) and agent["host"]
    holder = next(a for a in agents if a["spec"] == "holder")
    assert holder["state"] == "busy" and holder["tasks"] == ["held"]
    assert {a["agent_id"] for a in agents} == {s[0]["agent_id"] for s in report["slots"].values()}

    [running] = [r for r in report["running"] if r["task_id"] == "held"]
    assert running == {"task_id": "held", "attempt": 1, "agent_id": holder["agent_id"]}
    assert report["orphaned_claims"] == 0
    assert set(report["counts"]) == {s.value for s in TaskState}
    assert report["counts"]["claimed"] >= 1
    assert report["counts"]["done"] >= 2
    assert report["counts"]["rejected"] >= 1
    assert report["pending_files"] == 0

    release(fleet, "held")
    fleet.wait_state("held", TaskState.DONE)
    assert fleet.cli_json("show", "held")["output"] == "released"


def test_status_json_without_a_daemon_still_parses_and_exits_3(tmp_path: Path) -> None:
    home = Home(tmp_path / "idle")
    result = home.cli("status", "--json")
    assert result.returncode == 3
    report = json.loads(result.stdout)
    assert set(report) == STATUS_KEYS
    assert report["daemon"] == {"running": False, "pid": None, "started_at": None}
    assert report["agents"] == [] and report["running"] == []


# ---------------------------------------------------------------- show and tasks


def test_show_json_of_a_done_task(fleet: Home) -> None:
    shown = fleet.cli_json("show", "done-a")
    assert set(shown) >= {"id", "state", "priority", "agent", "attempts", "output", "reason"}
    assert shown["id"] == "done-a"
    assert shown["state"] == "done"
    assert shown["priority"] == 7
    assert shown["agent"] == "echo"
    assert shown["output"] == "alpha beta"
    assert shown["reason"] is None
    [attempt] = shown["attempts"]
    assert set(attempt) == {"number", "agent", "pid", "started_at", "ended_at", "outcome",
                            "reason"}
    assert attempt["number"] == 1
    assert attempt["outcome"] == "done"
    assert attempt["agent"].startswith("echo.")
    assert isinstance(attempt["pid"], int)
    assert attempt["started_at"] <= attempt["ended_at"]


def test_show_text_of_a_done_task(fleet: Home) -> None:
    result = fleet.cli("show", "done-a")
    assert result.returncode == 0
    text = result.stdout.decode()
    assert "task done-a: done" in text
    assert text.rstrip().endswith("alpha beta")


def test_show_of_a_rejected_file_gives_the_reason(fleet: Home) -> None:
    shown = fleet.cli_json("show", "broken")
    assert shown["state"] == "rejected"
    assert shown["reason"]
    assert shown["attempts"] == [] and shown["output"] is None


@pytest.mark.parametrize("task_id", ["no-such-task", "../../etc/passwd"])
def test_show_of_an_unknown_id_exits_2(fleet: Home, task_id: str) -> None:
    for args in (("show", task_id), ("show", task_id, "--json")):
        result = fleet.cli(*args)
        assert result.returncode == 2, result
        assert b"coordinator: error:" in result.stderr
        assert b"no task" in result.stderr
        assert result.stdout == b""


def test_tasks_state_done_json(fleet: Home) -> None:
    rows = fleet.cli_json("tasks", "--state", "done")
    assert isinstance(rows, list)
    ids = {row["id"] for row in rows}
    assert {"done-a", "done-b"} <= ids
    assert all(row["state"] == "done" for row in rows)
    row = next(r for r in rows if r["id"] == "done-a")
    assert row["priority"] == 7
    assert set(row) >= {"id", "state", "priority", "attempt"}


def test_tasks_limit_must_be_positive(fleet: Home) -> None:
    result = fleet.cli("tasks", "--limit", "0")
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr
    assert b"limit" in result.stderr


# ---------------------------------------------------------------- submit, cancel, retry


def test_submit_with_prompt_priority_and_labels(fleet: Home) -> None:
    result = fleet.cli("submit", "--prompt", "labelled work", "--id", "labelled",
                       "--priority", "3", "--agent", "nobody", "--label", "team=ml",
                       "--label", "ticket=T-1=x", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"id", "file"}
    assert out["id"] == "labelled"
    assert Path(out["file"]).parent == fleet.tasks
    fleet.wait_state("labelled", TaskState.QUEUED)  # no agent of spec "nobody": it waits
    task = fleet.spool.read_envelope("labelled").task
    assert task.prompt == "labelled work"
    assert task.priority == 3
    assert task.agent == "nobody"
    assert task.labels == {"team": "ml", "ticket": "T-1=x"}
    queued = {r["id"]: r for r in fleet.cli_json("tasks", "--state", "queued")}
    assert queued["labelled"]["priority"] == 3
    # The same id again is a conflict, and nothing new is dropped.
    again = fleet.cli("submit", "--prompt", "x", "--id", "labelled")
    assert again.returncode == 4
    assert not (fleet.tasks / "labelled.json").exists()


def test_submit_generates_an_id_and_reads_stdin(fleet: Home) -> None:
    result = fleet.cli("submit", "--prompt", "-", "--agent", "echo", "--json",
                       input=b"from stdin please")
    assert result.returncode == 0, result.stderr
    task_id = json.loads(result.stdout)["id"]
    fleet.wait_state(task_id, TaskState.DONE)
    assert fleet.cli_json("show", task_id)["output"] == "from stdin please"


@pytest.mark.parametrize(
    "args",
    [
        ("submit",),  # neither FILE nor --prompt
        ("submit", "--prompt", "x", "--label", "no-equals-sign"),
        ("submit", "--prompt", "x", "--priority", "soon"),
        ("submit", "--prompt", "x", "--priority", "-1"),
        ("submit", "--prompt", "   "),
    ],
)
def test_submit_usage_errors_exit_2_and_drop_nothing(fleet: Home, args: tuple[str, ...]) -> None:
    before = sorted(os.listdir(fleet.tasks))
    result = fleet.cli(*args)
    assert result.returncode == 2, result
    assert b"Traceback" not in result.stderr
    assert sorted(os.listdir(fleet.tasks)) == before


def test_cancel_and_retry_json(fleet: Home) -> None:
    fleet.cli("submit", "--prompt", "park me", "--id", "parked", "--agent", "nobody",
              check=True)
    fleet.wait_state("parked", TaskState.QUEUED)
    cancelled = fleet.cli("cancel", "parked", "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout) == {"id": "parked", "state": "cancelled"}
    assert fleet.state("parked") is TaskState.CANCELLED
    assert fleet.cli_json("show", "parked")["state"] == "cancelled"

    again = fleet.cli("cancel", "parked", "--json")
    assert again.returncode == 4  # already ended

    retried = fleet.cli("retry", "parked", "--json")
    assert retried.returncode == 0, retried.stderr
    doc = json.loads(retried.stdout)
    assert set(doc) == {"id", "state", "attempt"}
    assert doc["id"] == "parked" and doc["state"] == "queued"
    assert isinstance(doc["attempt"], int) and doc["attempt"] >= 1
    assert fleet.state("parked") is TaskState.QUEUED
    assert fleet.cli("retry", "parked").returncode == 4  # still queued

    assert fleet.cli("cancel", "no-such-task").returncode == 2
    assert fleet.cli("retry", "no-such-task").returncode == 2


def test_retry_of_a_done_task_runs_it_again(fleet: Home) -> None:
    fleet.cli("submit", "--prompt", "once more", "--id", "twice", "--agent", "echo", check=True)
    fleet.wait_state("twice", TaskState.DONE)
    doc = fleet.cli_json("retry", "twice")
    assert doc["state"] == "queued" and doc["attempt"] == 2
    wait_until(lambda: len(fleet.cli_json("show", "twice")["attempts"]) == 2
               and fleet.state("twice") is TaskState.DONE, 30, "second run done")
    shown = fleet.cli_json("show", "twice")
    assert [a["outcome"] for a in shown["attempts"]] == ["done", "done"]
    assert shown["output"] == "once more"


# ---------------------------------------------------------------- db rebuild


def test_db_rebuild_after_deleting_the_database_restores_counts(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.echo_spec("echo", concurrency=2)
    for i in range(4):
        home.drop(f"job{i}.toml", f'prompt = "job {i}"\nagent = "echo"\n')
    home.drop("parked.toml", 'prompt = "never runs"\nagent = "nobody"\n')
    home.drop("bad.json", b'{"prompt": ')
    daemon = home.start_daemon("--exit-when-idle")
    try:
        home.wait_state("parked", TaskState.QUEUED)
        assert home.cli("cancel", "parked").returncode == 0  # lets --exit-when-idle finish
        assert daemon.wait(timeout=60) == 0
    finally:
        home.stop_all()

    def counts() -> dict[str, int]:
        result = home.cli("status", "--json")
        assert result.returncode == 3  # the daemon is stopped, the document still complete
        value: dict[str, int] = json.loads(result.stdout)["counts"]
        return value

    before = counts()
    assert (before["done"], before["cancelled"], before["rejected"]) == (4, 1, 1)
    db = home.settings.db_file
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    emptied = counts()
    assert emptied["done"] == 0 and emptied["rejected"] == 0  # the record is gone ...

    result = home.cli("db", "rebuild", "--json")
    assert result.returncode == 0, result.stderr
    rebuilt = json.loads(result.stdout)
    assert rebuilt["tasks"] == 5
    assert rebuilt["rejected"] == 1
    assert rebuilt["attempts"] >= 4

    assert counts() == before  # ... and comes back from the spool
    done = {row["id"] for row in home.cli_json("tasks", "--state", "done")}
    assert done == {f"job{i}" for i in range(4)}
    shown = home.cli_json("show", "job2")
    assert shown["output"] == "job 2" and shown["attempts"][0]["outcome"] == "done"
