"""Agent supervision with a real daemon: restart with backoff, crash-loop give-up, no orphans
when an agent is SIGKILLed, one daemon per home, ``run --exit-when-idle``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.states import TaskState
from coordinator.views import fleet_status
from tests.support import Home, gone, group_members, wait_until

PY = sys.executable

HomeFactory = Callable[..., Home]


@pytest.fixture
def make_home(tmp_path: Path) -> Iterator[HomeFactory]:
    """Homes with custom settings; every process they started is stopped at teardown."""
    homes: list[Home] = []

    def factory(**settings: Any) -> Home:
        home = Home(tmp_path / f"home{len(homes)}", **settings)
        homes.append(home)
        return home

    yield factory
    for home in homes:
        home.stop_all()




def slot(home: Home, spec: str, index: int = 0) -> dict[str, Any] | None:
    """One slot of the daemon's report, read in-process (the data behind status --json)."""
    slots = fleet_status(home.settings)["slots"].get(spec) or []
    return slots[index] if len(slots) > index else None


def running_slot(home: Home, spec: str, not_pids: set[int]) -> dict[str, Any] | None:
    """The slot once it runs a live agent process other than ``not_pids``."""
    current = slot(home, spec)
    if (
        current
        and current["state"] == "running"
        and current["pid"]
        and current["pid"] not in not_pids
        and not gone(current["pid"])
    ):
        return current
    return None


def started_since_boot(pid: int) -> float:
    """When ``pid`` started, in seconds since boot (10 ms resolution).

    Not psutil's create_time: that adds the boot time, which /proc gives in whole seconds, so
    it can be off by up to a second against ``time.time()``. This is on CLOCK_BOOTTIME's scale.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def now_since_boot() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def assert_holds(predicate: Callable[[], bool], duration: float, what: str) -> None:
    """Check that ``predicate`` stays true for ``duration`` seconds (proving an absence)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert predicate(), what
        time.sleep(0.05)


def test_killed_agent_is_restarted_after_its_backoff(make_home: HomeFactory) -> None:
    backoff = 1.0
    home = make_home(restart_backoff=backoff)
    home.echo_spec("echo")
    home.start_daemon()
    first = wait_until(lambda: running_slot(home, "echo", set()), 30, "first agent running")
    assert first["restarts"] == 0
    agent_pid, agent_id = first["pid"], first["agent_id"]
    killed_at = now_since_boot()
    os.kill(agent_pid, signal.SIGKILL)

    second = wait_until(lambda: running_slot(home, "echo", {agent_pid}), 30, "agent restarted")
    assert second["agent_id"] != agent_id  # a fresh id: claims trace to one process
    assert second["restarts"] == 1
    assert second["last_exit"] == -signal.SIGKILL
    # Not restarted before the backoff had passed.
    assert started_since_boot(second["pid"]) >= killed_at + backoff - 0.02
    # The new agent is a working member of the fleet, seen by status --json.
    report = wait_until(
        lambda: (r := home.cli_json("status"))
        and any(a["agent_id"] == second["agent_id"] and a["alive"] for a in r["agents"])
        and r,
        30, "new agent in status",
    )
    assert report["slots"]["echo"][0]["restarts"] == 1
    home.drop("after.toml", 'prompt = "still served"\n')
    home.wait_state("after", TaskState.DONE)
    assert "restarting in" in home.log_text()


def test_repeated_crashes_put_the_slot_in_crash_loop(make_home: HomeFactory) -> None:
    backoff = 0.1
    home = make_home(crash_loop_restarts=3, crash_loop_window=60, restart_backoff=backoff)
    home.echo_spec("victim")
    home.echo_spec("steady")
    home.start_daemon()
    killed: set[int] = set()
    starts: list[float] = []
    kills: list[float] = []
    for n in range(3):
        current = wait_until(lambda: running_slot(home, "victim", killed), 30,
                             f"victim agent #{n + 1} running")
        starts.append(started_since_boot(current["pid"]))
        kills.append(now_since_boot())
        os.kill(current["pid"], signal.SIGKILL)
        killed.add(current["pid"])

    # Exponential backoff between the restarts: 0.1s, then 0.2s (lower bounds only).
    assert starts[1] >= kills[0] + backoff - 0.02
    assert starts[2] >= kills[1] + 2 * backoff - 0.02

    def crash_loop() -> dict[str, Any] | None:
        current = slot(home, "victim")
        return current if current and current["state"] == "crash-loop" else None

    wait_until(crash_loop, 30, "slot in crash-loop")
    status = home.cli("status", "--json")
    assert status.returncode == 0, status.stderr  # the daemon itself keeps running
    report = json.loads(status.stdout)
    victim = report["slots"]["victim"][0]
    assert victim["state"] == "crash-loop"
    assert victim["pid"] is None
    assert victim["restarts"] == 2
    assert report["slots"]["steady"][0]["state"] == "running"

    # Given up: no new victim agent appears (longer than the next backoff would have been,
    # plus the daemon's one-second report interval).
    def not_restarted() -> bool:
        current = slot(home, "victim")
        live = [a for a in fleet_status(home.settings)["agents"]
                if a["spec"] == "victim" and a["alive"]]
        return bool(current and current["state"] == "crash-loop" and not live)

    assert_holds(not_restarted, 2.0, "crash-looped slot was restarted")
    assert "giving up" in home.log_text()
    # The rest of the fleet still works.
    home.drop("work.toml", 'prompt = "served by steady"\n')
    home.wait_state("work", TaskState.DONE)
    assert home.cli_json("show", "work")["attempts"][0]["agent"].startswith("steady.")


# The command child: starts a grandchild `sleep 300` in its own (the child's) process group,
# records both pids in pids-<attempt>, then blocks like an agent CLI waiting on a model.
BLOCKING_CHILD = """
import os, subprocess, sys, time
directory = sys.argv[1]
g = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
attempt = os.environ["COORDINATOR_ATTEMPT"]
tmp = os.path.join(directory, f".pids-{attempt}")
with open(tmp, "w") as f:
    f.write(f"{os.getpid()} {os.getpgid(0)} {g.pid} {os.getppid()}")
os.rename(tmp, os.path.join(directory, f"pids-{attempt}"))
time.sleep(300)
"""


def test_agent_children_die_with_the_agent_on_sigkill(make_home: HomeFactory) -> None:
    home = make_home(shutdown_grace=0.5)
    marks = home.root / "marks"
    marks.mkdir()
    home.command_spec("sleeper", [PY, "-c", BLOCKING_CHILD, str(marks)])
    home.start_daemon()
    started: list[int] = []
    try:
        home.drop("blocked.toml", 'prompt = "wait"\n')
        pidfile = marks / "pids-1"
        wait_until(pidfile.exists, 30, "command child started")
        child, pgid, grandchild, agent_pid = (int(x) for x in pidfile.read_text().split())
        started += [child, grandchild]
        assert pgid == child and os.getpgid(grandchild) == child
        assert agent_pid == slot(home, "sleeper")["pid"] or agent_pid in {
            a["pid"] for a in fleet_status(home.settings)["agents"]
        }
        os.kill(agent_pid, signal.SIGKILL)
        # The child dies with its parent (parent-death signal); the grandchild, in the child's
        # group, is killed by the daemon's reaper from the agent's record of its children.
        wait_until(lambda: gone(child) and gone(grandchild) and not group_members(child),
                   10, "the killed agent's process group gone")
        # And the task is not lost: the next attempt runs on the restarted agent.
        wait_until((marks / "pids-2").exists, 30, "second attempt started")
        started += [int(x) for x in (marks / "pids-2").read_text().split()[:3:2]]
        shown = home.cli_json("show", "blocked")
        assert shown["attempts"][0]["outcome"] == "crashed"
    finally:
        home.stop_all()
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_second_daemon_on_the_same_home_exits_4(make_home: HomeFactory) -> None:
    home = make_home()
    home.echo_spec("echo")
    first = home.start_daemon()
    home.wait_daemon_ready()
    second = home.cli("run", timeout=60)
    assert second.returncode == 4, second.stderr
    assert b"already runs" in second.stderr
    assert str(first.pid).encode() in second.stderr  # names the daemon that holds the home
    # The first one is untouched.
    assert first.poll() is None
    status = home.cli_json("status")
    assert status["daemon"]["running"] is True
    assert status["daemon"]["pid"] == first.pid
    home.drop("ok.toml", 'prompt = "fine"\n')
    home.wait_state("ok", TaskState.DONE)


def test_run_exit_when_idle_drains_then_exits_0(make_home: HomeFactory) -> None:
    home = make_home()
    home.echo_spec("echo", processes=2, concurrency=2, delay=5)
    for i in range(8):
        home.drop(f"batch{i}.toml", f'prompt = "item {i}"\npriority = {i % 3}\n')
    daemon = home.start_daemon("--exit-when-idle")
    assert daemon.wait(timeout=90) == 0, home.log_text()[-4000:]
    states = {f"batch{i}": home.state(f"batch{i}") for i in range(8)}
    assert set(states.values()) == {TaskState.DONE}, (states, home.log_text()[-4000:])
    assert list(home.tasks.iterdir()) == []
    report = fleet_status(home.settings)
    assert report["daemon"]["running"] is False
    assert report["counts"]["done"] == 8
    assert report["counts"]["queued"] == 0 and report["running"] == []
    assert not any(a["alive"] for a in report["agents"])  # its agents stopped with it


def test_run_exit_when_idle_with_nothing_to_do_exits_0(make_home: HomeFactory) -> None:
    home = make_home()
    home.echo_spec("echo")
    daemon = home.start_daemon("--exit-when-idle")
    assert daemon.wait(timeout=60) == 0, home.log_text()[-4000:]
    assert home.cli("status").returncode == 3
