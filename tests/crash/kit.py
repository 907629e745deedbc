"""Helpers for the crash tests: protocol drivers, the fake agent CLI, and the exactly-once check.

"Done exactly once" (:func:`assert_done_once`) means, for one task:

- its one token is ``tasks/ID/done~N``: no other terminal marker, nothing in ``queue/`` or
  ``claims/``;
- there is exactly one result file, ``result~N.json``, and it is attempt N's;
- the attempt log never shows two attempts of the task running at once. Each attempt number is
  started at most once, in increasing order, and every attempt before the done one is over before
  the next one starts. Attempt A is over before a later attempt B starts when either

  (a) A's end record was logged before B's start record (the holder ended it itself, or a reaper
      ended it before anyone claimed the task again), or
  (b) A's holder is a process this test killed, froze, or saw exit, at a time *before B's start
      record was written*, and that process is gone now; A's end record is then either the
      reaper's, with outcome ``crashed`` or ``stalled``, or missing. A reaper renames the claim
      first and logs the end record after it, so that record may legitimately trail B's start,
      and it is missing if the reaper was killed between the two; the rename itself happens only
      after the reaper proved the holder dead (or stopped it), which is what (b) checks from the
      outside.

  Any other order fails the check.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from coordinator.models import Task
from coordinator.spool import attempts as alog
from coordinator.spool.filespool import SeqClock, Submission
from coordinator.spool.layout import terminal_marker
from coordinator.spool.leases import probe_agent
from coordinator.states import TaskState
from coordinator.taskfile import sha256
from tests.support import Home, clean_env, kill_strays, wait_until

HERE = Path(__file__).parent
DRIVER = HERE / "protocol_driver.py"
FAKE_CLI = HERE / "fake_cli.py"


# ---------------------------------------------------------------------- processes


def running(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie is dead: it runs nothing)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def find_procs(needle: str) -> list[psutil.Process]:
    """Live processes with ``needle`` in one of their arguments."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.pid != os.getpid() and any(needle in part for part in cmdline) \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def strays(root: Path) -> list[str]:
    """Every live process whose command line mentions ``root``, as ``pid: cmdline``."""
    return [f"{p.pid}: {' '.join(p.info['cmdline'] or [])}" for p in find_procs(str(root))]


def finish(home: Home) -> None:
    """Stop the test's processes gracefully and assert that nothing of the test survives."""
    for proc in home.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in home.procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"pid {proc.pid} ({proc.args}) ignored SIGTERM for 20s") from None
    # Killed processes take a moment to become zombies; give them that moment, no more.
    try:
        wait_until(lambda: not strays(home.root), 5, "no stray processes")
    except AssertionError:
        raise AssertionError(f"processes survived the test: {strays(home.root)}") from None
    assert kill_strays(home.root) == []


def agent_pid(home: Home, agent_id: str) -> int:
    probe = probe_agent(home.spool.layout, agent_id)
    assert probe.alive and probe.pid is not None, f"agent {agent_id} is not alive"
    return probe.pid


class Driver:
    """``protocol_driver.py`` as a real process, stopped at a step until the test kills it."""

    def __init__(self, home: Home, *args: str) -> None:
        self.home = home
        self.stderr_path = home.root / f"driver-{uuid.uuid4().hex[:8]}.err"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(DRIVER), "--home", str(home.root), *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=clean_env(),
            )
        home.procs.append(self.proc)

    def paused(self, step: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the driver to report that it stopped at ``step``; returns what it reported."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        try:
            report = json.loads(line)
        except ValueError:
            report = {}
        if report.get("paused") != step:
            self.kill()
            raise AssertionError(
                f"driver did not stop at {step!r}: {line!r}\n{self.stderr_path.read_text()}"
            )
        return dict(report)

    def kill(self) -> float:
        """SIGKILL the driver and reap it; returns a time by which it was certainly dead."""
        self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        return time.time()


# ---------------------------------------------------------------------- tasks and the fake CLI


def accept(home: Home, prompts: dict[str, str], max_attempts: int = 3) -> None:
    """Queue tasks straight through ``FileSpool.accept``, the function intake uses."""
    batch = [
        Submission(Task(id=tid, prompt=prompt), f"{tid}.toml", sha256(prompt.encode()),
                   max_attempts)
        for tid, prompt in prompts.items()
    ]
    home.spool.accept(batch, SeqClock())


@dataclass
class FakeCli:
    """A ``command`` agent spec running ``fake_cli.py``, with its ledger and hold directories."""

    home: Home
    spec: Path
    ledger_dir: Path
    hold_dir: Path

    @classmethod
    def install(cls, home: Home, name: str = "worker", processes: int = 1,
                concurrency: int = 1) -> FakeCli:
        ledger_dir = home.root / "ledger"
        hold_dir = home.root / "hold"
        ledger_dir.mkdir(exist_ok=True)
        hold_dir.mkdir(exist_ok=True)
        argv = [sys.executable, str(FAKE_CLI), str(ledger_dir), str(hold_dir), "{prompt}"]
        spec = home.command_spec(name, argv, processes=processes, concurrency=concurrency)
        return cls(home, spec, ledger_dir, hold_dir)

    def release(self, task_id: str) -> None:
        (self.hold_dir / task_id).touch()

    def runs(self, task_id: str) -> list[tuple[str, int, int, float]]:
        """Ledger lines ``(begin|end, attempt, pid, time)`` in the order they were written."""
        path = self.ledger_dir / f"{task_id}.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            kind, attempt, pid, at = line.split()
            out.append((kind, int(attempt), int(pid), float(at)))
        return out

    def begun(self, task_id: str) -> list[int]:
        return [a for kind, a, _, _ in self.runs(task_id) if kind == "begin"]

    def completed(self, task_id: str) -> list[int]:
        return [a for kind, a, _, _ in self.runs(task_id) if kind == "end"]


def marker_prompt(task_id: str, *words: str) -> str:
    """A prompt whose first word is unique to this task (found in ``ps`` by tests)."""
    return " ".join([f"crashmark-{task_id}-{uuid.uuid4().hex[:10]}", *words])


# ---------------------------------------------------------------------- the exactly-once check


def task_tokens(home: Home, task_id: str) -> dict[str, list[str]]:
    layout = home.spool.layout
    return {
        "queue": [n for n in os.listdir(layout.queue) if n.split("~")[2:3] == [task_id]],
        "claims": [n for n in os.listdir(layout.claims) if n.split("~")[2:3] == [task_id]],
        "terminal": sorted(n for n in os.listdir(layout.task_dir(task_id))
                           if terminal_marker(n) is not None),
    }


def events_of(home: Home, task_id: str) -> list[dict[str, Any]]:
    return alog.read_events(home.spool.layout.attempts_log(task_id))


def end_records(events: list[dict[str, Any]], attempt: int) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "end" and e.get("n") == attempt]


def assert_done_once(
    home: Home, task_id: str, *, dead: dict[int, float] | None = None
) -> dict[str, Any]:
    """Assert the module docstring's "done exactly once"; returns the result and the log.

    ``dead`` maps each holder pid the test killed, froze or saw exit to the time it did so
    (after which that process did nothing more).
    """
    dead = dead or {}
    spool = home.spool
    loc = spool.locate(task_id)
    assert loc.state is TaskState.DONE, f"{task_id} is {loc.state}"
    n = loc.attempt
    tokens = task_tokens(home, task_id)
    assert tokens == {"queue": [], "claims": [], "terminal": [f"done~{n}"]}, tokens
    task_dir = spool.layout.task_dir(task_id)
    results = sorted(e for e in os.listdir(task_dir) if e.startswith("result~"))
    assert results == [f"result~{n}.json"], results
    result = spool.read_result(task_id, n)
    assert result is not None and result["attempt"] == n and result["task_id"] == task_id

    events = events_of(home, task_id)
    starts = [e for e in events if e.get("event") == "start"]
    numbers = [e["n"] for e in starts]
    assert numbers == sorted(set(numbers)), f"attempts started twice or out of order: {numbers}"
    assert all(number <= n for number in numbers), f"an attempt after the done one: {numbers}"
    for earlier, later in itertools.pairwise(starts):
        ends = [e for e in end_records(events, earlier["n"]) if e.get("outcome") != "superseded"]
        if ends and ends[0]["at"] <= later["at"]:
            continue  # (a)
        holder = earlier.get("pid")
        where = f"attempt {earlier['n']} (holder {holder}) vs attempt {later['n']}"
        assert not ends or (
            ends[0].get("by") == "reaper" and ends[0].get("outcome") in ("crashed", "stalled")
        ), f"{where}: ended at {ends[0]['at']} after the next start at {later['at']}: {ends[0]}"
        assert isinstance(holder, int) and holder in dead, (
            f"{where}: no end record before the next start, and the holder was not killed"
        )
        assert dead[holder] <= later["at"], (
            f"{where}: the next attempt started at {later['at']}, before the holder was killed "
            f"at {dead[holder]}"
        )
        assert not running(holder), f"{where}: the holder still runs"
    return {"attempt": n, "result": result, "events": events, "starts": numbers}


def outcome_of(events: list[dict[str, Any]], attempt: int) -> str | None:
    ends = end_records(events, attempt)
    return ends[0].get("outcome") if ends else None


def wait_done(home: Home, task_ids: list[str], timeout: float = 45.0) -> None:
    def all_done() -> bool:
        return all(home.state(t) is TaskState.DONE for t in task_ids)

    try:
        wait_until(all_done, timeout, f"{task_ids} done")
    except AssertionError:
        states = {t: home.state(t) for t in task_ids}
        raise AssertionError(f"not all done after {timeout}s: {states}\n"
                             f"{home.log_text()[-4000:]}") from None


def lease_gone(home: Home, agent_id: str) -> bool:
    return not home.spool.layout.lease_path(agent_id).exists()
