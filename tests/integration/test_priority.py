"""Priority order under contention: several real agents race over a mixed-priority queue."""

from __future__ import annotations

import json
import random

from coordinator.models import Task
from coordinator.spool.filespool import SeqClock, Submission
from coordinator.states import TaskState
from tests.support import Home, wait_until


def test_racing_agents_start_tasks_in_priority_order(home: Home) -> None:
    agents = 3
    spec = home.echo_spec(processes=0, concurrency=1, delay=20.0)
    spool = home.spool
    rng = random.Random(7)
    tasks = [Task(id=f"p{i:03d}", prompt="a b c", priority=rng.choice([0, 5, 10, 50, 100]))
             for i in range(150)]
    # Accept everything before any agent runs, so every claim is a choice among all tasks (an
    # agent running while tokens are created one by one would rightly take the first one).
    # The backlog is long enough (~60 ms a task) that all agents are racing well before it ends.
    spool.accept([Submission(t, f"{t.id}.toml", t.id, 1) for t in tasks], SeqClock())
    procs = [home.start_agent(spec, "--exit-when-idle") for _ in range(agents)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    for t in tasks:
        assert spool.locate(t.id).state is TaskState.DONE
    rank = {t.id: (t.priority, spool.read_envelope(t.id).seq) for t in tasks}
    starts = []
    for t in tasks:
        for line in spool.layout.attempts_log(t.id).read_text().splitlines():
            event = json.loads(line)
            if event["event"] == "start":
                starts.append((event["at"], t.id))
    starts.sort()
    order = [tid for _, tid in starts]
    assert sorted(order) == sorted(rank)
    # Each agent takes the most urgent task left when it claims. With `agents` claimers, a task
    # can start before at most agents-1 more urgent tasks that were claimed at the same moment by
    # the others; anything beyond that is a priority inversion.
    for position, tid in enumerate(order):
        overtaken = [o for o in order[position + 1:] if rank[o] < rank[tid]]
        assert len(overtaken) < agents, (tid, rank[tid], overtaken[:5])
    # And the distinct agents all took part: the contention was real.
    holders = {json.loads(line)["agent"]
               for t in tasks
               for line in spool.layout.attempts_log(t.id).read_text().splitlines()
               if json.loads(line)["event"] == "start"}
    assert len(holders) == agents


def test_new_urgent_task_overtakes_a_long_queue(home: Home) -> None:
    spec = home.echo_spec(processes=0, concurrency=1, delay=2.0)
    spool = home.spool
    backlog = [Task(id=f"b{i:03d}", prompt="x y", priority=100) for i in range(200)]
    clock = SeqClock()
    spool.accept([Submission(t, f"{t.id}.toml", t.id, 1) for t in backlog], clock)
    agent = home.start_agent(spec, "--exit-when-idle")
    wait_until(lambda: any(spool.layout.result_path(t.id, 1).exists() for t in backlog), 30,
               "the agent to be working")
    urgent = Task(id="urgent", prompt="now", priority=0)
    spool.accept([Submission(urgent, "urgent.toml", "u", 1)], clock)
    home.wait_state("urgent", TaskState.DONE, timeout=30)
    done_backlog = sum(1 for t in backlog if spool.layout.result_path(t.id, 1).exists())
    # Learned of by inotify, not by a re-listing: it runs next, long before the backlog drains.
    assert done_backlog < 150, done_backlog
    assert agent.wait(timeout=120) == 0
