"""Window 4: SIGKILL the reaper between the steps of a reclaim; the next reaper finishes the job.

A holder (``protocol_driver.py agent``) is killed holding a claim; then a reaper process
(``protocol_driver.py reaper``, the real ``Reaper.reap``) is killed at one step of reclaiming it.
An ordinary agent started by hand (with its own reaper) must then bring the task to done exactly
once: a requeue is redone or completed, a promotion is never turned into a second run.
"""

from __future__ import annotations

import os

import pytest

from tests.crash.kit import (
    Driver,
    FakeCli,
    accept,
    assert_done_once,
    end_records,
    finish,
    lease_gone,
    marker_prompt,
    task_tokens,
    wait_done,
)
from tests.support import Home, wait_until

CASES = [
    # (holder's step, reaper's step, attempt that completes the task)
    ("started", "before-move", 2),  # death proven, claim not moved: the next reaper redoes it
    ("started", "moved", 2),  # claim requeued as attempt 2, end record of attempt 1 never written
    ("started", "logged", 2),  # requeued and logged, dead agent's lease left behind
    ("result-written", "before-move", 1),  # about to promote: the next reaper promotes
    ("result-written", "moved", 1),  # promoted to done~1, end record never written
]


@pytest.mark.parametrize(("holder_step", "reaper_step", "done_attempt"), CASES)
def test_reaper_killed_between_steps(
    home: Home, holder_step: str, reaper_step: str, done_attempt: int
) -> None:
    cli = FakeCli.install(home)
    accept(home, {"job": marker_prompt("job")})
    holder = Driver(home, "agent", "--task", "job", "--stop-at", holder_step)
    facts = holder.paused(holder_step)
    killed_at = holder.kill()

    reaper = Driver(home, "reaper", "--stop-at", reaper_step)
    reaper.paused(reaper_step)
    reaper.kill()
    tokens = task_tokens(home, "job")
    if reaper_step == "before-move":
        assert len(tokens["claims"]) == 1, tokens
    elif done_attempt == 1:
        assert tokens == {"queue": [], "claims": [], "terminal": ["done~1"]}
    else:
        assert len(tokens["queue"]) == 1 and tokens["queue"][0].split("~")[3] == "2", tokens
    lease = home.spool.layout.lease_path(facts["agent_id"])
    assert lease.exists()  # the killed reaper never got as far as removing it

    home.start_agent(cli.spec)
    wait_done(home, ["job"])
    wait_until(lambda: lease_gone(home, facts["agent_id"]), 20, "dead holder's lease removed")
    summary = assert_done_once(home, "job", dead={facts["pid"]: killed_at})
    assert summary["attempt"] == done_attempt
    ends = end_records(summary["events"], 1)
    # At most one end record per attempt, even though two reapers worked on it.
    assert len(ends) == (0 if reaper_step == "moved" else 1), ends
    if ends:
        assert ends[0]["by"] == "reaper"
        assert ends[0]["outcome"] == ("done" if done_attempt == 1 else "crashed")
    if done_attempt == 1:
        assert cli.runs("job") == []  # promoted: the task never ran again
        assert summary["result"]["agent"] == facts["agent_id"]
    else:
        assert cli.begun("job") == [2]
        assert cli.completed("job") == [2]
    assert not [n for n in os.listdir(home.spool.layout.agents) if n.startswith("driver.")]
    finish(home)
