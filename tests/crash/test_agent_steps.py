"""SIGKILL an agent at every step of the claim protocol; the task still ends done exactly once.

The holder is ``protocol_driver.py agent`` (the real lease, claim, start record, pipeline and
``complete_batch``), stopped at one step and killed there. Recovery is an ordinary agent process
started by hand (so it runs its own reaper) with the ``command`` backend, whose ledger counts how
often the task really ran again.
"""

from __future__ import annotations

import pytest

from coordinator.states import TaskState
from tests.crash.kit import (
    Driver,
    FakeCli,
    accept,
    assert_done_once,
    finish,
    lease_gone,
    marker_prompt,
    outcome_of,
    wait_done,
)
from tests.support import Home, wait_until

# step -> (attempt that completes the task, how attempt 1 ends in the log, runs after the kill)
STEPS = {
    # Window 1: claimed (the rename happened) but no start record and no pipeline yet.
    "claimed": (2, "crashed", 1),
    "started": (2, "crashed", 1),
    # Window 2 (library-level; the real agent and its child process are in test_agent_process):
    # output partially written to out~1.part.
    "streaming": (2, "crashed", 1),
    # The result is flushed under its temporary name only: nothing was committed, so it runs again.
    "result-staged": (2, "crashed", 1),
    # Window 3: result~1.json in place, claim not yet renamed to done~1. The reaper must promote
    # it to done without running the task again.
    "result-written": (1, "done", 0),
    # done~1 in place, the agent died before logging its end record: nothing left to do.
    "fenced": (1, None, 0),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_agent_killed_at_step(home: Home, step: str) -> None:
    done_attempt, first_outcome, reruns = STEPS[step]
    cli = FakeCli.install(home)
    prompt = marker_prompt("job", "and", "a", "few", "more", "words")  # streamed word by word
    accept(home, {"job": prompt})
    driver = Driver(home, "agent", "--task", "job", "--stop-at", step)
    facts = driver.paused(step)
    killed_at = driver.kill()
    agent = home.start_agent(cli.spec)
    wait_done(home, ["job"])
    # The recovering agent's reaper has also cleaned up after the dead holder.
    wait_until(lambda: lease_gone(home, facts["agent_id"]), 20, "dead driver's lease removed")

    summary = assert_done_once(home, "job", dead={facts["pid"]: killed_at})
    assert summary["attempt"] == done_attempt
    events = summary["events"]
    assert outcome_of(events, 1) == first_outcome, events
    if first_outcome is not None:
        (end,) = [e for e in events if e.get("event") == "end" and e.get("n") == 1]
        assert end["by"] == ("reaper" if step != "fenced" else "agent")
        if step == "result-written":
            assert end["reason"] == "promoted"
    if done_attempt == 1:
        # Promoted or already fenced: the driver's own result stands, nothing ran again.
        assert summary["result"]["agent"] == facts["agent_id"]
        assert summary["result"]["output"] == prompt
        assert summary["starts"] == ([] if step == "claimed" else [1])
    else:
        assert summary["result"]["output"] == (
            "partial output of job\nrest of the answer for job"
        )
        expected_starts = [2] if step == "claimed" else [1, 2]
        assert summary["starts"] == expected_starts
    assert cli.begun("job") == ([2] * reruns)
    assert cli.completed("job") == ([2] * reruns)
    if step == "streaming":
        # The dead attempt's partial output is kept as history, the new attempt has its own.
        partial = home.spool.read_partial("job", 1)
        assert partial and prompt.startswith(partial) and partial != prompt
    assert home.state("job") is TaskState.DONE
    assert agent.poll() is None
    finish(home)
