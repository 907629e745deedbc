"""The daemon SIGKILLed: while its agents run (window 5) and during intake of a burst (window 6).

A restarted daemon must find the truth on disk: stop the agents the dead daemon left running,
reclaim their tasks, accept every dropped file exactly once, and finish everything.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from coordinator.spool.layout import terminal_marker
from coordinator.states import TaskState
from tests.crash.kit import (
    Driver,
    FakeCli,
    agent_pid,
    assert_done_once,
    end_records,
    find_procs,
    finish,
    marker_prompt,
    running,
    wait_done,
)
from tests.support import Home, wait_until


def mid_stream(home: Home, task_ids: list[str]) -> dict[str, int]:
    """Once every task streams its first output, the pid of each task's agent."""
    spool = home.spool
    if not all("partial output" in spool.read_partial(t, 1) for t in task_ids):
        return {}
    pids = {}
    for task_id in task_ids:
        claim = spool.locate(task_id).claim
        assert claim is not None
        pids[task_id] = agent_pid(home, claim.agent_id)
    return pids


def group_of(prompt: str) -> list[int]:
    """The fake CLI running ``prompt`` and its grandchild, by the prompt's unique marker."""
    return [p.pid for p in find_procs(prompt.split()[0])]


def test_restarted_daemon_stops_agents_left_by_a_killed_one(home: Home) -> None:
    """Window 5: the daemon dies by SIGKILL while two agents are mid-task. The agents are frozen
    first, so they are certainly still there (holding their claims and their children) when the
    new daemon starts: it must stop them, kill their children, reclaim, and finish everything."""
    cli = FakeCli.install(home, processes=2)
    daemon = home.start_daemon()
    prompts = {t: marker_prompt(t, "hold", "grandchild") for t in ("a", "b")}
    prompts["c"] = marker_prompt("c")
    for task_id, prompt in prompts.items():
        priority = 9 if task_id == "c" else 1  # c waits in the queue behind a and b
        home.drop(f"{task_id}.toml", f'prompt = "{prompt}"\npriority = {priority}\n')
    agents = wait_until(lambda: mid_stream(home, ["a", "b"]), 30, "a and b mid-stream")
    assert len(set(agents.values())) == 2
    children = wait_until(lambda: [p for t in "ab" for p in group_of(prompts[t])]
                          if all(len(group_of(prompts[t])) == 2 for t in "ab") else None,
                          10, "the CLIs and their children")
    assert home.state("c") is TaskState.QUEUED

    frozen_at = time.time()
    for pid in agents.values():
        os.kill(pid, signal.SIGSTOP)
    daemon.kill()
    daemon.wait(timeout=10)
    assert all(running(pid) for pid in agents.values())  # leftovers, still holding claims

    home.start_daemon()
    wait_until(lambda: not any(running(p) for p in [*agents.values(), *children]), 30,
               "leftover agents and their children stopped by the new daemon")
    log = home.log_text()
    for pid in agents.values():
        assert f"(pid {pid}) left by a dead daemon" in log
    cli.release("a")
    cli.release("b")
    wait_done(home, ["a", "b", "c"])

    dead = dict.fromkeys(agents.values(), frozen_at)
    for task_id in ("a", "b"):
        summary = assert_done_once(home, task_id, dead=dead)
        assert summary["attempt"] == 2 and summary["starts"] == [1, 2]
        (end,) = end_records(summary["events"], 1)
        assert (end["by"], end["outcome"]) == ("reaper", "crashed")
        assert cli.begun(task_id) == [1, 2] and cli.completed(task_id) == [2]
    summary = assert_done_once(home, "c", dead=dead)
    assert summary["attempt"] == 1
    assert cli.begun("c") == [1] and cli.completed("c") == [1]
    finish(home)


def test_agents_of_a_killed_daemon_give_their_tasks_back(tmp_path: Path) -> None:
    """Window 5, unfrozen: the parent-death signal tells each agent its daemon died; it stops its
    child group and gives its task back (released, not counted as a failure) on its own."""
    home = Home(tmp_path / "home", shutdown_grace=1.0)
    try:
        cli = FakeCli.install(home, processes=2)
        daemon = home.start_daemon()
        prompts = {t: marker_prompt(t, "hold", "grandchild") for t in ("a", "b")}
        for task_id, prompt in prompts.items():
            home.drop(f"{task_id}.toml", f'prompt = "{prompt}"\n')
        agents = wait_until(lambda: mid_stream(home, ["a", "b"]), 30, "a and b mid-stream")
        children = wait_until(lambda: [p for t in "ab" for p in group_of(prompts[t])]
                              if all(len(group_of(prompts[t])) == 2 for t in "ab") else None,
                              10, "the CLIs and their children")
        daemon.kill()
        daemon.wait(timeout=10)
        wait_until(lambda: not any(running(p) for p in [*agents.values(), *children]), 30,
                   "orphaned agents and their children gone by themselves")
        gone_at = time.time()
        for task_id in ("a", "b"):
            assert home.state(task_id) is TaskState.QUEUED

        home.start_daemon()
        cli.release("a")
        cli.release("b")
        wait_done(home, ["a", "b"])
        for task_id in ("a", "b"):
            summary = assert_done_once(home, task_id, dead=dict.fromkeys(agents.values(),
                                                                         gone_at))
            assert summary["attempt"] == 2
            (end,) = end_records(summary["events"], 1)
            assert (end["by"], end["outcome"]) == ("agent", "released")
            assert cli.begun(task_id) == [1, 2] and cli.completed(task_id) == [2]
        finish(home)
    finally:
        home.stop_all()


# ---------------------------------------------------------------------- window 6: intake


def drop_burst(home: Home, count: int) -> list[str]:
    """Task files dropped a while ago (as if waiting out a restart): intake, starting, takes
    them all at once, in one batch."""
    ids = [f"burst-{i:03d}" for i in range(count)]
    past = time.time() - 60
    for i, task_id in enumerate(ids):
        path = home.drop(f"{task_id}.toml", f'prompt = "burst task {i}"\npriority = {i % 7}\n')
        os.utime(path, (past, past))
    return ids


def assert_burst_done_once(home: Home, ids: list[str], dead: dict[int, float]) -> None:
    """Every dropped file became exactly one task, done once; nothing rejected or left over."""
    assert os.listdir(home.tasks) == []
    layout = home.spool.layout
    assert os.listdir(layout.rejected) == []
    assert sorted(os.listdir(layout.tasks)) == ids
    for task_id in ids:
        summary = assert_done_once(home, task_id, dead=dead)
        assert summary["result"]["output"] == f"burst task {int(task_id.split('-')[1])}"
        entries = set(os.listdir(layout.task_dir(task_id)))
        leftovers = {e for e in entries if e.startswith(".")}
        assert leftovers == set(), f"{task_id}: {leftovers}"
        assert "source.toml" in entries
        assert [e for e in entries if terminal_marker(e)] == [f"done~{summary['attempt']}"]


def test_daemon_killed_during_intake_of_a_burst(home: Home) -> None:
    """Window 6 with the real daemon: a burst is waiting in tasks.d when it starts; it is frozen
    the moment the first queue token appears (intake half done), then killed."""
    home.echo_spec(processes=2, concurrency=4)
    ids = drop_burst(home, 200)
    daemon = home.start_daemon()
    queue = home.spool.layout.queue
    deadline = time.monotonic() + 30
    while not os.listdir(queue):  # a tight poll: the window is a few hundred milliseconds
        assert time.monotonic() < deadline, "intake never queued anything"
        time.sleep(0.001)
    os.kill(daemon.pid, signal.SIGSTOP)
    agents = [p.pid for p in psutil.Process(daemon.pid).children()]
    left_in_tasks_d = len(os.listdir(home.tasks))
    daemon.kill()
    daemon.wait(timeout=10)
    assert left_in_tasks_d > 0, "the daemon had finished intake before it was stopped"
    # Its agents notice the death (parent-death signal), finish what they hold, and exit.
    wait_until(lambda: not any(running(p) for p in agents), 30, "the dead daemon's agents exit")
    gone_at = time.time()

    home.start_daemon()
    wait_done(home, ids, timeout=90)
    assert_burst_done_once(home, ids, dict.fromkeys(agents, gone_at))
    finish(home)


@pytest.mark.parametrize("step", ["accepting", "moving-sources"])
def test_intake_killed_inside_a_batch(home: Home, step: str) -> None:
    """Window 6 at exact steps (``protocol_driver.py intake``, the real ``Intake``):
    ``accepting``: tasks 1-19 queued, task 20's task.json in place without its queue token,
    tasks 21-40 staged only; ``moving-sources``: all 40 durable, sources 1-19 moved."""
    home.echo_spec(processes=1, concurrency=4)
    ids = drop_burst(home, 40)
    driver = Driver(home, "intake", "--stop-at", step, "--nth", "20")
    driver.paused(step)
    driver.kill()
    layout = home.spool.layout
    queued = len(os.listdir(layout.queue))
    assert queued == (19 if step == "accepting" else 40)
    assert len(os.listdir(home.tasks)) == (40 if step == "accepting" else 21)

    home.start_daemon()
    wait_done(home, ids, timeout=60)
    assert_burst_done_once(home, ids, {})
    finish(home)
