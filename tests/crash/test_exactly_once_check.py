"""The crash tests' "done exactly once" check itself rejects the violations it is meant to catch.

The spool is driven in-process with the real ``FileSpool`` calls; the attempt log is then extended
by hand with the records an overlapping or duplicated run would leave.
"""

from __future__ import annotations

import time

import pytest

from coordinator.spool import attempts as alog
from coordinator.spool.layout import QueueName
from coordinator.states import AttemptOutcome
from tests.crash.kit import accept, assert_done_once
from tests.support import Home

DEAD_PID = 999_999_999  # not a pid Linux hands out (pid_max is at most 2**22)


def queued(home: Home) -> QueueName:
    name = home.spool.locate("job").queue
    assert name is not None
    return name


def run_twice(home: Home, first_end_delay: float = 0.0, by: str = "reaper",
              outcome: str = "crashed") -> tuple[float, float]:
    """Attempt 1 reclaimed by the reaper, attempt 2 done; returns (start of 2, end record of 1).

    With ``first_end_delay`` the reaper's end record of attempt 1 is written after attempt 2
    started, as it legitimately may be (rename first, record after).
    """
    accept(home, {"job": "some prompt"})
    spool = home.spool
    first = spool.claim(queued(home), "a1")
    assert first is not None
    spool.start_attempt(first, DEAD_PID)
    log = spool.layout.attempts_log("job")
    original = alog.log_event
    if first_end_delay:
        alog.log_event = lambda *a, **k: None  # type: ignore[assignment]
    try:
        spool.end_attempt(first, AttemptOutcome.CRASHED, "died", by="reaper")
    finally:
        alog.log_event = original  # type: ignore[assignment]
    second = spool.claim(queued(home), "a2")
    assert second is not None
    spool.start_attempt(second, 12345)
    start2 = time.time()
    if first_end_delay:
        time.sleep(first_end_delay)
        alog.log_event(log, "end", n=1, outcome=outcome, by=by, agent="a1")
    end1 = time.time()
    spool.complete(second, {"task_id": "job", "attempt": 2, "output": "x"})
    return start2, end1


def test_sequential_attempts_pass(home: Home) -> None:
    run_twice(home)
    assert assert_done_once(home, "job")["starts"] == [1, 2]


def test_late_reaper_record_passes_only_for_a_holder_killed_in_time(home: Home) -> None:
    start2, _ = run_twice(home, first_end_delay=0.05)
    with pytest.raises(AssertionError, match="the holder was not killed"):
        assert_done_once(home, "job")
    with pytest.raises(AssertionError, match="before the holder was killed"):
        assert_done_once(home, "job", dead={DEAD_PID: start2 + 1})
    assert_done_once(home, "job", dead={DEAD_PID: start2 - 1})


def test_overlap_by_a_live_holder_fails(home: Home) -> None:
    # Attempt 1's own agent logged its end after attempt 2 had started: two runs at once, even
    # though the test killed that holder later on.
    start2, _ = run_twice(home, first_end_delay=0.05, by="agent", outcome="released")
    with pytest.raises(AssertionError, match="after the next start"):
        assert_done_once(home, "job", dead={DEAD_PID: start2 - 1})


def test_second_result_or_second_start_fails(home: Home) -> None:
    run_twice(home)
    layout = home.spool.layout
    (layout.task_dir("job") / "result~1.json").write_text("{}")
    with pytest.raises(AssertionError, match=r"result~1\.json"):
        assert_done_once(home, "job")
    (layout.task_dir("job") / "result~1.json").unlink()
    alog.log_event(layout.attempts_log("job"), "start", n=2, agent="a3", pid=1)
    with pytest.raises(AssertionError, match="started twice"):
        assert_done_once(home, "job")
