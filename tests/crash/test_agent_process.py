"""Real agent processes under a real daemon: killed mid-stream, and stalled (alive but silent).

The backend is ``command`` running ``fake_cli.py``, which prints part of its answer, starts a
grandchild in its own process group, and then waits for a hold file, so the test can act while the
attempt is provably mid-stream. Its ledger counts the runs that reached the end.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from coordinator.states import TaskState
from tests.crash.kit import (
    FAKE_CLI,
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


def command_procs(prompt: str) -> tuple[psutil.Process, psutil.Process] | None:
    """The fake CLI running ``prompt`` and its grandchild, once both exist."""
    marker = prompt.split()[0]
    child = [p for p in find_procs(marker) if str(FAKE_CLI) in p.info["cmdline"]]
    grandchild = [p for p in find_procs(f"{marker}-grandchild")]
    if len(child) == 1 and len(grandchild) == 1:
        return child[0], grandchild[0]
    return None


def streaming(home: Home, task_id: str) -> bool:
    return "partial output" in home.spool.read_partial(task_id, 1)


def holder(home: Home, task_id: str) -> str:
    claim = home.spool.locate(task_id).claim
    assert claim is not None, f"{task_id} is not claimed"
    return claim.agent_id


def test_agent_killed_mid_stream_takes_its_child_group_along(home: Home) -> None:
    """Window 2: SIGKILL the agent while its child has streamed part of the answer."""
    cli = FakeCli.install(home)
    home.start_daemon()
    prompt = marker_prompt("job", "hold", "grandchild")
    home.drop("job.toml", f'prompt = "{prompt}"\n')
    wait_until(lambda: streaming(home, "job"), 30, "attempt 1 mid-stream")
    child, grandchild = wait_until(lambda: command_procs(prompt), 10, "the CLI and its child")
    agent_id = holder(home, "job")
    pid = agent_pid(home, agent_id)
    assert child.ppid() == pid and os.getpgid(grandchild.pid) == child.pid

    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    # The parent-death signal takes the CLI; the reaper kills the rest of its recorded group.
    wait_until(lambda: not any(running(p) for p in (pid, child.pid, grandchild.pid)), 20,
               "agent, its CLI and the CLI's child gone")
    cli.release("job")
    wait_done(home, ["job"])

    summary = assert_done_once(home, "job", dead={pid: killed_at})
    assert summary["attempt"] == 2 and summary["starts"] == [1, 2]
    (end,) = end_records(summary["events"], 1)
    assert (end["by"], end["outcome"]) == ("reaper", "crashed")
    assert summary["result"]["agent"] != agent_id  # the restarted agent, a new id
    assert summary["result"]["output"] == "partial output of job\nrest of the answer for job"
    assert home.spool.read_partial("job", 1) == "partial output of job\n"
    assert cli.begun("job") == [1, 2]
    assert cli.completed("job") == [2]
    finish(home)


def test_stalled_agent_is_stopped_whole_but_a_slow_heartbeating_one_is_not(tmp_path: Path) -> None:
    """An agent frozen with SIGSTOP (alive, silent) is stopped after ``stall_timeout`` with its
    children's groups and its task completed by another agent; a task that runs longer than the
    stall timeout under an agent that keeps heartbeating is left alone."""
    home = Home(tmp_path / "home", stall_timeout=2.0)
    try:
        cli = FakeCli.install(home, processes=2)
        home.start_daemon()
        stuck = marker_prompt("stuck", "hold", "grandchild")
        slow = marker_prompt("slow", "sleep=5")  # well past the 2s stall timeout
        home.drop("stuck.toml", f'prompt = "{stuck}"\n')
        home.drop("slow.toml", f'prompt = "{slow}"\n')
        wait_until(lambda: streaming(home, "stuck") and streaming(home, "slow"), 30,
                   "both tasks mid-stream")
        child, grandchild = wait_until(lambda: command_procs(stuck), 10, "stuck's CLI")
        stuck_agent, slow_agent = holder(home, "stuck"), holder(home, "slow")
        slow_claim = home.spool.locate("slow").claim
        assert stuck_agent != slow_agent
        pid = agent_pid(home, stuck_agent)

        frozen_at = time.time()
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: not any(running(p) for p in (pid, child.pid, grandchild.pid)), 30,
                   "the stalled agent and its children stopped")
        # Stopped after the stall timeout, not before; the slow task stayed with its agent.
        assert time.time() - frozen_at >= 2.0
        slow_now = home.spool.locate("slow")
        assert slow_now.state is TaskState.DONE or slow_now.claim == slow_claim
        cli.release("stuck")
        wait_done(home, ["stuck", "slow"])

        summary = assert_done_once(home, "stuck", dead={pid: frozen_at})
        assert summary["attempt"] == 2
        (end,) = end_records(summary["events"], 1)
        assert (end["by"], end["outcome"]) == ("reaper", "stalled")
        assert summary["result"]["agent"] != stuck_agent
        assert cli.begun("stuck") == [1, 2] and cli.completed("stuck") == [2]

        slow_summary = assert_done_once(home, "slow")
        assert slow_summary["attempt"] == 1 and slow_summary["starts"] == [1]
        (slow_end,) = end_records(slow_summary["events"], 1)
        assert (slow_end["by"], slow_end["outcome"]) == ("agent", "done")
        assert slow_summary["result"]["agent"] == slow_agent
        assert cli.begun("slow") == [1] and cli.completed("slow") == [1]
        log = home.log_text()
        assert f"agent {stuck_agent} (pid {pid}) silent for" in log
        assert f"agent {slow_agent} (pid" not in log
        finish(home)
    finally:
        home.stop_all()
