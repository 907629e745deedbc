"""Stateful property tests of the file spool: random histories keep every guarantee of DESIGN.md.

``SpoolMachine`` drives a real ``FileSpool`` in a fresh directory per example through enqueue,
claim, heartbeat, complete, fail, kill, reclaim, cancel and retry, and after every step compares
the files with a plain model (a dict of expected task states). Every agent holds a real
``AgentLease`` in a real process forked from a small "zygote" (one Python start per test instead
of one per agent); the test process makes that agent's claims and completions on its behalf, with
its agent id, and SIGKILLs the process to kill the agent, so the kernel really drops its flock.

``test_claim_order_*`` check guarantee 3: one agent's claims from a stable queue come out in
priority order, then arrival order, under interleavings chosen by Hypothesis (one rename or listing
at a time) and under real contention between processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from coordinator.errors import StateConflict
from coordinator.models import Task
from coordinator.spool.filespool import FileSpool, SeqClock, Submission
from coordinator.spool.fsutil import write_file
from coordinator.spool.layout import ClaimName, QueueName, SpoolLayout, terminal_marker
from coordinator.spool.leases import list_agent_ids, probe_agent
from coordinator.spool.reaper import Reaper
from coordinator.states import AttemptOutcome, TaskState
from tests.support import clean_env

SPECS = ("alpha", "beta")
STALL_TIMEOUT = 3600.0  # far above any example's run time: only go_silent makes an agent stall
KILL_GRACE = 5.0

# A zygote: imports the lease code once, then forks one agent process per "spawn" request. Each
# agent takes a real AgentLease and heartbeats through it whenever it reads a byte from its
# command pipe. Agents stay in the zygote's process group (the zygote has its own session), so
# the reaper stops a stalled one with kill_process; kill_group is avoided because its scan of the
# whole process table raises ProcessLookupError when any unrelated process exits during the scan
# (os.getpgid in coordinator.proc._group_members), which would make this test flaky.
# SIGCHLD is ignored so that dead agents never linger as zombies (which psutil, waiting on a
# process that is not its child, would take for alive); waitpid then blocks until the agent is
# gone and raises ChildProcessError.
ZYGOTE = r"""
import os, signal, sys
from pathlib import Path
from coordinator.spool.layout import SpoolLayout
from coordinator.spool.leases import AgentLease

STALL = float(sys.argv[1])
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
agents = {}  # agent id -> (pid, command fd, reply fd)

def agent_main(root, agent_id, spec, commands, replies):
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    lease = AgentLease(SpoolLayout(Path(root)), agent_id, {"spec": spec, "stall_timeout": STALL})
    os.write(replies, b"r")
    while os.read(commands, 1):
        lease.heartbeat()
        os.write(replies, b"k")

def spawn(root, agent_id, spec):
    cmd_r, cmd_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for _, w, r in agents.values():
                os.close(w)
                os.close(r)
            os.close(cmd_w)
            os.close(rep_r)
            agent_main(root, agent_id, spec, cmd_r, rep_w)
        finally:
            os._exit(0)
    os.close(cmd_r)
    os.close(rep_w)
    agents[agent_id] = (pid, cmd_w, rep_r)
    return str(pid) if os.read(rep_r, 1) == b"r" else "error"

def reap(agent_id, sig=None):
    pid, w, r = agents.pop(agent_id)
    if sig is not None:
        os.kill(pid, sig)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # gone, and reaped by the kernel (SIGCHLD is ignored)
    os.close(w)
    os.close(r)

for line in sys.stdin:
    cmd, *args = line.rstrip("\n").split("\t")
    if cmd == "spawn":
        answer = spawn(*args)
    elif cmd == "beat":
        _, w, r = agents[args[0]]
        os.write(w, b"h")
        answer = "ok" if os.read(r, 1) == b"k" else "error"
    elif cmd == "wait":  # the caller killed it: collect it, so its exit is complete
        reap(args[0])
        answer = "ok"
    elif cmd == "reset":
        for agent_id in list(agents):
            reap(agent_id, signal.SIGKILL)
        answer = "ok"
    sys.stdout.write(answer + "\n")
    sys.stdout.flush()
for agent_id in list(agents):
    reap(agent_id, signal.SIGKILL)
"""


class Zygote:
    """The test side of ``ZYGOTE``: one request, one answer line."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(STALL_TIMEOUT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=clean_env(),
            start_new_session=True,  # a group of its own: no signal for an agent reaches pytest
        )

    def ask(self, *words: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\t".join(words) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer not in ("", "error"), f"zygote failed on {words}"
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        finally:
            self.proc.stdout.close()


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    try:
        yield z
    finally:
        z.close()


@dataclass
class AgentModel:
    agent_id: str
    spec: str
    pid: int
    alive: bool = True
    silent: bool = False  # its lease's mtime is far in the past: the reaper will stop it
    lease: bool = True  # agents/ID.lock should exist
    in_hand: list[ClaimName] = field(default_factory=list)  # claims it has not ended itself


@dataclass
class TaskModel:
    task_id: str
    priority: int
    seq: int
    agent_filter: str | None
    max_attempts: int
    sha: str
    state: TaskState = TaskState.QUEUED
    attempt: int = 1
    claim: ClaimName | None = None
    retry_after: int = 0
    budget_used: int = 0  # attempts since the last retry that count against max_attempts
    final_failure: bool = False
    outcomes: dict[int, tuple[AttemptOutcome, str]] = field(default_factory=dict)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)  # result files on disk
    claimed: list[int] = field(default_factory=list)  # attempt numbers, in claim order
    refused: set[int] = field(default_factory=set)  # attempts whose completion was fenced off
    last_seen: int = 1

    def serves(self, spec: str) -> bool:
        return self.agent_filter in (None, spec)


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self, zygote: Zygote) -> None:
        super().__init__()
        self.zygote = zygote
        self.root = Path(tempfile.mkdtemp(prefix="spool-machine-"))
        self.layout = SpoolLayout(self.root / "spool").ensure()
        self.spool = FileSpool(self.layout)
        self.clock = SeqClock()
        self.tasks: dict[str, TaskModel] = {}
        self.agents: dict[str, AgentModel] = {}
        self.ghosts: list[ClaimName] = []  # in-hand claims of agents that were killed
        self.litter: set[Path] = set()  # result temp files left by agents killed mid-write
        self.counter = 0

    def teardown(self) -> None:
        try:
            self.zygote.ask("reset")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ model helpers

    def _next(self) -> int:
        self.counter += 1
        return self.counter

    def _live(self) -> list[AgentModel]:
        return [a for a in self.agents.values() if a.alive]

    def _busy(self) -> list[AgentModel]:
        """Live agents that hold a claim."""
        return [a for a in self._live() if any(map(self._is_current, a.in_hand))]

    def _able(self) -> list[AgentModel]:
        """Live agents that could claim a task now."""
        return [a for a in self._live() if self._servable(a.spec)]

    def _servable(self, spec: str) -> list[TaskModel]:
        queued = [t for t in self.tasks.values() if t.state is TaskState.QUEUED and t.serves(spec)]
        return sorted(queued, key=lambda t: (t.priority, t.seq))

    def _is_current(self, claim: ClaimName) -> bool:
        return self.tasks[claim.task_id].claim == claim

    def _holders(self) -> dict[str, list[ClaimName]]:
        """Claims some agent may still try to end, by agent (stale ones included)."""
        held: dict[str, list[ClaimName]] = defaultdict(list)
        for claim in [c for a in self.agents.values() for c in a.in_hand] + self.ghosts:
            held[claim.agent_id].append(claim)
        return held

    def _drop_in_hand(self, claim: ClaimName) -> None:
        agent = self.agents[claim.agent_id]
        if claim in agent.in_hand:
            agent.in_hand.remove(claim)
        else:
            self.ghosts.remove(claim)

    def _end_claim(
        self, task: TaskModel, outcome: AttemptOutcome, final: bool = False
    ) -> TaskState:
        """What ``end_attempt`` does to the task's current claim."""
        assert task.claim is not None
        n, agent = task.attempt, task.claim.agent_id
        if outcome is not AttemptOutcome.CANCELLED and n in task.results:
            target, outcome = TaskState.DONE, AttemptOutcome.DONE  # promoted
            event("result of a dead agent promoted")
        elif outcome is AttemptOutcome.CANCELLED:
            target = TaskState.CANCELLED
        elif final:
            target, task.final_failure = TaskState.FAILED, True
        elif outcome.counts_against_budget:
            task.budget_used += 1
            target = TaskState.FAILED if task.budget_used >= task.max_attempts else TaskState.QUEUED
        else:
            target = TaskState.QUEUED
        if outcome.counts_against_budget and final:
            task.budget_used += 1
        task.outcomes[n] = (outcome, agent)
        task.state, task.claim = target, None
        if target is TaskState.QUEUED:
            task.attempt = n + 1
        elif target is TaskState.FAILED and not final:
            event("failed after max_attempts")
        return target

    def _claim_next(self, agent: AgentModel) -> ClaimName:
        """Claim as an agent does: the first token in the queue's order that it can serve."""
        assert probe_agent(self.layout, agent.agent_id).alive, "claims only by live agents"
        expected = self._servable(agent.spec)[0]
        name = next(n for n in self.layout.list_queue() if n.accepts(agent.spec))
        claim = self.spool.claim(name, agent.agent_id)
        assert claim is not None, "nobody else claims, so the rename must win"
        # Guarantee 3: the most urgent task it can serve, equal priorities in arrival order.
        assert (name.task_id, name.attempt) == (expected.task_id, expected.attempt)
        assert all(claim.attempt > n for n in expected.claimed), "attempt numbers only grow"
        expected.claimed.append(claim.attempt)
        expected.state, expected.claim = TaskState.CLAIMED, claim
        return claim

    def _spawn(self, spec: str) -> None:
        agent_id = f"{spec}-{self._next()}"
        pid = int(self.zygote.ask("spawn", str(self.layout.root), agent_id, spec))
        self.agents[agent_id] = AgentModel(agent_id, spec, pid)

    # ------------------------------------------------------------------ rules

    @initialize()
    def start_agents(self) -> None:
        for spec in SPECS:
            self._spawn(spec)

    @precondition(lambda self: len(self._live()) < 3 and len(self.agents) < 6)
    @rule(spec=st.sampled_from(SPECS))
    def spawn(self, spec: str) -> None:
        self._spawn(spec)

    @precondition(lambda self: len(self.tasks) < 6)
    @rule(
        batch=st.lists(
            st.tuples(st.integers(0, 2), st.sampled_from([None, *SPECS]), st.integers(1, 3)),
            min_size=1,
            max_size=3,
        ),
        again=st.sampled_from([None, "same source", "other source"]),
        data=st.data(),
    )
    def enqueue(
        self, batch: list[tuple[int, str | None, int]], again: str | None, data: st.DataObject
    ) -> None:
        """Accept a batch of new tasks, perhaps with an id seen before: a leftover source file
        (accepted before, so nothing changes) or another task's id (a duplicate)."""
        subs = []
        for priority, agent, max_attempts in batch:
            task_id = f"t{self._next()}"
            task = Task(
                id=task_id, prompt="p", priority=priority, agent=agent, max_attempts=max_attempts
            )
            subs.append(Submission(task, f"{task_id}.toml", f"sha-{task_id}", max_attempts))
        old = None
        if again is not None and self.tasks:
            old = self.tasks[data.draw(st.sampled_from(sorted(self.tasks)), label="again")]
            sha = old.sha if again == "same source" else f"other-{old.sha}"
            task = Task(id=old.task_id, prompt="p", priority=old.priority)
            subs.insert(
                data.draw(st.integers(0, len(subs)), label="at"),
                Submission(task, "again.toml", sha, 1),
            )
        accepted = self.spool.accept(subs, self.clock)
        assert sorted(a.task_id for a in accepted) == sorted(s.task.id for s in subs)
        for acc in accepted:
            if old is not None and acc.task_id == old.task_id:
                assert acc.queue is None
                assert acc.duplicate_of_other is (again == "other source")
                continue
            assert acc.queue is not None and acc.queue.attempt == 1
            sub = next(s for s in subs if s.task.id == acc.task_id)
            self.tasks[acc.task_id] = TaskModel(
                acc.task_id,
                sub.task.priority,
                acc.queue.seq,
                sub.task.agent,
                sub.max_attempts,
                sub.source_sha256,
            )

    @precondition(lambda self: bool(self._able()))
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        agent = data.draw(st.sampled_from(self._able()), label="agent")
        claim = self._claim_next(agent)
        self.spool.start_attempt(claim, agent.pid)
        self.tasks[claim.task_id].outcomes[claim.attempt] = (AttemptOutcome.RUNNING, agent.agent_id)
        agent.in_hand.append(claim)

    @precondition(lambda self: any(a.silent for a in self._live()))
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        agent = data.draw(st.sampled_from([a for a in self._live() if a.silent]), label="agent")
        self.zygote.ask("beat", agent.agent_id)
        agent.silent = False

    @precondition(lambda self: self._busy() and not any(a.silent for a in self._live()))
    @rule(data=st.data())
    def go_silent(self, data: st.DataObject) -> None:
        """An agent that holds a claim hangs: its last heartbeat is now far in the past."""
        agent = data.draw(st.sampled_from(self._busy()), label="agent")
        past = time.time() - 10 * STALL_TIMEOUT
        os.utime(self.layout.lease_path(agent.agent_id), (past, past))
        agent.silent = True

    @precondition(lambda self: bool(self._holders()))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        """complete_batch by one agent, possibly for claims taken away from it (or after death:
        a completion that was under way when it died)."""
        holders = self._holders()
        agent_id = data.draw(st.sampled_from(sorted(holders)), label="agent")
        claims = data.draw(
            st.lists(st.sampled_from(holders[agent_id]), min_size=1, unique_by=str), label="batch"
        )
        items = [
            (c, {"attempt": c.attempt, "agent": agent_id, "nonce": self._next()}) for c in claims
        ]
        expected = []
        for claim, payload in items:
            task = self.tasks[claim.task_id]
            expected.append(self._is_current(claim))
            if expected[-1]:
                task.outcomes[claim.attempt] = (AttemptOutcome.DONE, agent_id)
                task.results[claim.attempt] = payload
                task.state, task.claim = TaskState.DONE, None
            else:
                task.refused.add(claim.attempt)
                event("completion fenced off")
            if expected[-1] and not self.agents[agent_id].alive:
                event("completion under way when its agent died")
            if expected[-1] and task.retry_after:
                event("done again after a retry")
            self._drop_in_hand(claim)
        assert self.spool.complete_batch(items) == expected, "the fence decides, nothing else"

    @precondition(lambda self: bool(self._holders()))
    @rule(
        data=st.data(),
        outcome=st.sampled_from(
            [AttemptOutcome.FAILED, AttemptOutcome.TIMEOUT, AttemptOutcome.RELEASED]
        ),
        final=st.booleans(),
    )
    def fail(self, data: st.DataObject, outcome: AttemptOutcome, final: bool) -> None:
        """The agent ends its attempt without a result (end_attempt)."""
        held = [c for claims in self._holders().values() for c in claims]
        claim = data.draw(st.sampled_from(sorted(held, key=str)), label="claim")
        final = final and outcome is AttemptOutcome.FAILED
        task = self.tasks[claim.task_id]
        expected = self._end_claim(task, outcome, final) if self._is_current(claim) else None
        self._drop_in_hand(claim)
        got = self.spool.end_attempt(claim, outcome, "test", by="agent", final=final)
        assert got is expected

    @precondition(lambda self: bool(self._busy() or self._able()))
    @rule(
        data=st.data(),
        window=st.sampled_from(["idle", "after_claim", "after_result_tmp", "after_result"]),
    )
    def kill(self, data: st.DataObject, window: str) -> None:
        """SIGKILL an agent, possibly in a window of the protocol: right after a claim (before its
        start record), after writing a result's temporary file, after renaming the result into
        place but before the fence."""
        victims = self._busy() + [a for a in self._able() if a not in self._busy()]
        agent = data.draw(st.sampled_from(victims), label="agent")
        involved: ClaimName | None = None
        current = [c for c in agent.in_hand if self._is_current(c)]
        if window == "after_claim" and self._servable(agent.spec):
            involved = self._claim_next(agent)
        elif window.startswith("after_result") and current:
            involved = data.draw(st.sampled_from(current), label="claim")
            agent.in_hand.remove(involved)
            task = self.tasks[involved.task_id]
            payload = {"attempt": involved.attempt, "agent": agent.agent_id, "nonce": -1}
            tmp = self.spool._result_tmp(involved)  # the name complete_batch writes first
            write_file(tmp, json.dumps(payload).encode(), fsync=False)
            if window == "after_result":
                os.rename(tmp, self.layout.result_path(involved.task_id, involved.attempt))
                task.results[involved.attempt] = payload
            else:
                self.litter.add(tmp)
        os.kill(agent.pid, signal.SIGKILL)
        self.zygote.ask("wait", agent.agent_id)
        agent.alive = False
        self.ghosts.extend(agent.in_hand)
        agent.in_hand = []

    @precondition(
        lambda self: any(a.lease and (a.silent or not a.alive) for a in self.agents.values())
    )
    @rule()
    def reap(self) -> None:
        reclaimed = set()
        stopped = set()
        for agent in self.agents.values():
            if not agent.lease or (agent.alive and not agent.silent):
                continue
            outcome = AttemptOutcome.STALLED if agent.alive else AttemptOutcome.CRASHED
            if agent.alive:
                stopped.add(agent.agent_id)
            for task in self.tasks.values():
                if task.claim is not None and task.claim.agent_id == agent.agent_id:
                    n = task.attempt
                    reclaimed.add((task.task_id, n, self._end_claim(task, outcome)))
            agent.lease = agent.alive = False
        report = Reaper(self.spool, stall_timeout=STALL_TIMEOUT, kill_grace=KILL_GRACE).reap()
        for agent_id in report.stopped_agents:
            self.zygote.ask("wait", agent_id)
            self.ghosts.extend(self.agents[agent_id].in_hand)
            self.agents[agent_id].in_hand = []
        assert set(report.stopped_agents) == stopped
        if stopped:
            event("stalled agent stopped by the reaper")
        assert set(report.reclaimed) == reclaimed

    @precondition(lambda self: any(not t.state.terminal for t in self.tasks.values()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        running = sorted(t.task_id for t in self.tasks.values() if not t.state.terminal)
        task = self.tasks[data.draw(st.sampled_from(running), label="task")]
        with pytest.raises(StateConflict):
            self.spool.retry(task.task_id)  # only ended tasks retry
        if task.state is TaskState.CLAIMED:
            self._end_claim(task, AttemptOutcome.CANCELLED)
        task.state = TaskState.CANCELLED
        loc = self.spool.cancel(task.task_id)
        assert (loc.state, loc.attempt) == (TaskState.CANCELLED, task.attempt)

    @precondition(lambda self: any(t.state.terminal for t in self.tasks.values()))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        ended = sorted(t.task_id for t in self.tasks.values() if t.state.terminal)
        task = self.tasks[data.draw(st.sampled_from(ended), label="task")]
        with pytest.raises(StateConflict):
            self.spool.cancel(task.task_id)  # nothing to cancel once it ended
        task.retry_after, task.attempt = task.attempt, task.attempt + 1
        task.state, task.budget_used, task.final_failure = TaskState.QUEUED, 0, False
        loc = self.spool.retry(task.task_id)
        assert (loc.state, loc.attempt) == (TaskState.QUEUED, task.attempt)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def one_token_per_task(self) -> None:
        """Each accepted task has exactly one token; nothing is lost, nothing is invented."""
        tokens: dict[str, list[str]] = defaultdict(list)
        queue_names = os.listdir(self.layout.queue)
        claim_names = os.listdir(self.layout.claims)
        assert all(QueueName.parse(n) for n in queue_names), queue_names
        assert all(ClaimName.parse(n) for n in claim_names), claim_names
        for name in self.layout.list_queue():
            tokens[name.task_id].append(f"queue~{name.attempt}")
        for claim in self.layout.list_claims():
            tokens[claim.task_id].append(f"claim~{claim.attempt}")
            assert claim.agent_id in self.agents, "a claim by an agent that never lived"
        for task_id in os.listdir(self.layout.tasks):
            for entry in os.listdir(self.layout.task_dir(task_id)):
                if terminal_marker(entry) is not None:
                    tokens[task_id].append(entry)
        assert set(tokens) == set(self.tasks)
        for task_id, found in tokens.items():
            assert len(found) == 1, f"{task_id} has tokens {found}"

    @invariant()
    def spool_agrees_with_model(self) -> None:
        for task in self.tasks.values():
            loc = self.spool.locate(task.task_id)
            assert (loc.state, loc.attempt) == (task.state, task.attempt), task.task_id
            assert loc.claim == task.claim
            assert loc.attempt >= task.last_seen, "attempt numbers only grow"
            task.last_seen = loc.attempt

    @invariant()
    def results_are_exactly_once(self) -> None:
        for task in self.tasks.values():
            task_dir = self.layout.task_dir(task.task_id)
            on_disk = {
                n: self.spool.read_result(task.task_id, n)
                for n in range(1, task.attempt + 1)
                if self.layout.result_path(task.task_id, n).exists()
            }
            assert on_disk == task.results, f"{task.task_id}: results on disk"
            if task.state is TaskState.DONE:
                # Results of attempts before the last retry stay as history; since then, one.
                since_retry = {n for n in on_disk if n > task.retry_after}
                assert since_retry == {task.attempt}, f"{task.task_id}: {sorted(on_disk)}"
            for n in task.refused:
                assert not (task.state is TaskState.DONE and task.attempt == n)
                assert n not in on_disk, "a fenced-off completion left its result"
            hidden = {task_dir / e for e in os.listdir(task_dir) if e.startswith(".")}
            assert hidden <= self.litter, f"stray temporary files {hidden - self.litter}"

    @invariant()
    def attempt_log_agrees(self) -> None:
        for task in self.tasks.values():
            current = task.attempt if task.state is TaskState.CLAIMED else None
            records = self.spool.attempts(task.task_id, current)
            assert {r.number: (r.outcome, r.agent) for r in records} == task.outcomes, task.task_id
            if task.state is TaskState.FAILED and not task.final_failure:
                used = sum(
                    1
                    for r in records
                    if task.retry_after < r.number <= task.attempt
                    and r.outcome.counts_against_budget
                )
                assert used == task.budget_used == task.max_attempts, task.task_id

    @invariant()
    def leases_tell_the_truth(self) -> None:
        """Only agents that should have a lease have one; a killed agent's flock is free."""
        expected = {a.agent_id for a in self.agents.values() if a.lease}
        assert set(list_agent_ids(self.layout)) == expected
        for agent in self.agents.values():
            assert probe_agent(self.layout, agent.agent_id).alive is agent.alive, agent.agent_id


def test_spool_state_machine(zygote: Zygote) -> None:
    run_state_machine_as_test(
        lambda: SpoolMachine(zygote),
        settings=settings(max_examples=50, stateful_step_count=30, deadline=None),
    )


def test_cancel_while_queued_records_no_attempt(tmp_path: Path) -> None:
    """Regression (found by the machine): cancelling a queued task logged a "cancel" event that
    the attempt fold took for an attempt without an end record, so `show` listed a phantom
    crashed attempt that never ran."""
    spool = FileSpool(SpoolLayout(tmp_path / "spool").ensure())
    spool.accept([Submission(Task(id="t1", prompt="p"), "t1.toml", "s1", 2)], SeqClock())
    assert spool.cancel("t1").state is TaskState.CANCELLED
    assert spool.attempts("t1") == []
    spool.retry("t1")
    claim = spool.claim(spool.locate("t1").queue or pytest.fail("not queued"), "agent-1")
    assert claim is not None
    assert spool.end_attempt(claim, AttemptOutcome.FAILED, "x", by="agent") is TaskState.QUEUED
    assert [(r.number, r.outcome) for r in spool.attempts("t1")] == [(2, AttemptOutcome.FAILED)]


# ---------------------------------------------------------------------- claim order


def _accept_all(spool: FileSpool, tasks: list[tuple[int, str | None]], cuts: list[int]) -> None:
    subs = [
        Submission(Task(id=f"t{i}", prompt="p", priority=p, agent=a), f"t{i}.toml", f"s{i}", 1)
        for i, (p, a) in enumerate(tasks)
    ]
    clock = SeqClock()
    for start, end in zip([0, *cuts], [*cuts, len(subs)], strict=True):
        spool.accept(subs[start:end], clock)


@given(
    tasks=st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from([None, *SPECS])), min_size=1, max_size=12
    ),
    data=st.data(),
)
@settings(max_examples=100, deadline=None)
def test_claim_order_under_interleavings(
    tasks: list[tuple[int, str | None]], data: st.DataObject
) -> None:
    """Agents list the queue and rename tokens one step at a time, in an order Hypothesis picks;
    each claim is, when it happens, the most urgent task its agent can serve."""
    # Arrivals in up to three batches (each batch is one accept with its own flushes).
    cuts = sorted(data.draw(st.sets(st.integers(0, len(tasks)), max_size=2), label="batches"))
    root = Path(tempfile.mkdtemp(prefix="claim-order-"))
    try:
        spool = FileSpool(SpoolLayout(root).ensure())
        _accept_all(spool, tasks, cuts)
        agents = {"a1": "alpha", "a2": "alpha", "b1": "beta"}
        relist = {a: data.draw(st.booleans(), label=f"{a} relists") for a in agents}
        pending: dict[str, list[QueueName] | None] = dict.fromkeys(agents)
        claimed: dict[str, list[QueueName]] = defaultdict(list)
        while pending:
            agent_id = data.draw(st.sampled_from(sorted(pending)), label="step")
            spec = agents[agent_id]
            names = pending[agent_id]
            if not names:  # list the queue (again): a stale list is what makes races
                names = [n for n in spool.layout.list_queue() if n.accepts(spec)]
                if not names:
                    del pending[agent_id]
                    continue
                pending[agent_id] = names
                continue
            name = names.pop(0)
            if spool.claim(name, agent_id) is None:
                continue
            before = [n for n in spool.layout.list_queue() if n.accepts(spec)]
            assert all(n.sort_key > name.sort_key for n in before), (agent_id, name, before)
            claimed[agent_id].append(name)
            if relist[agent_id]:
                pending[agent_id] = None
        for agent_id, names in claimed.items():
            keys = [n.sort_key for n in names]
            assert keys == sorted(keys), f"{agent_id} claimed out of order"
        everyone = sorted(str(n.task_id) for names in claimed.values() for n in names)
        assert everyone == sorted(f"t{i}" for i in range(len(tasks))), "each task claimed once"
    finally:
        shutil.rmtree(root, ignore_errors=True)


CLAIMER = r"""
import sys
from pathlib import Path
from coordinator.spool.filespool import FileSpool
from coordinator.spool.layout import SpoolLayout

root, agent_id, spec = sys.argv[1:]
spool = FileSpool(SpoolLayout(Path(root)))
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.readline()  # go: every claimer starts at once
while names := [n for n in spool.layout.list_queue() if n.accepts(spec)]:
    for name in names:
        if spool.claim(name, agent_id) is not None:
            sys.stdout.write(str(name) + "\n")
            break
"""


def test_claim_order_under_real_contention(tmp_path: Path) -> None:
    """Three processes race for one queue; each one's claims come out in priority order."""
    layout = SpoolLayout(tmp_path / "spool").ensure()
    spool = FileSpool(layout)
    tasks = [((i * 7) % 5, [None, "alpha", "beta"][i % 3]) for i in range(150)]
    _accept_all(spool, tasks, [50, 100])  # three batches of arrivals
    agents = {"a1": "alpha", "a2": "alpha", "b1": "beta"}
    procs = {
        agent_id: subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(layout.root), agent_id, spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        for agent_id, spec in agents.items()
    }
    outputs = {}
    try:
        for proc in procs.values():
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for agent_id, proc in procs.items():
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            outputs[agent_id] = [QueueName.parse(line) for line in out.splitlines()]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for agent_id, names in outputs.items():
        keys = [n.sort_key for n in names if n is not None]
        assert len(keys) == len(names) and keys == sorted(keys), f"{agent_id} out of order"
    everyone = sorted(n.task_id for names in outputs.values() for n in names if n is not None)
    assert everyone == sorted(f"t{i}" for i in range(len(tasks))), "each task claimed once"
    assert not os.listdir(layout.queue)
