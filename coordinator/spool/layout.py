"""Where everything lives in the spool, and how token names encode a task's place in line.

::

    spool/
      queue/P~S~ID~N~F          token of a queued task: priority P, arrival S, id, next attempt N,
                                agent filter F ("_" = any agent); names sort in claim order
      claims/P~S~ID~N~F~AGENT   token of a claimed task: attempt N held by agent AGENT
      tasks/ID/task.json        the accepted task (immutable), written durably before its token
      tasks/ID/attempts.jsonl   attempt log (append-only): starts, ends, causes, retries
      tasks/ID/out~N.part       attempt N's output as it streams
      tasks/ID/result~N.json    attempt N's final result, written durably before the fence
      tasks/ID/done~N           token of a task that attempt N completed (likewise failed~N,
                                cancelled~N)
      agents/AGENT.lock         an agent's lease: flock held while it lives, mtime = heartbeat
      agents/AGENT.children     process groups of the agent's children (killed when it dies)
      rejected/STAMP-NAME       a rejected task file, with STAMP-NAME.reason beside it
      daemon.lock, daemon.json  the daemon's lock and its supervision report
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from coordinator.states import TaskState

SEP = "~"
ANY_AGENT = "_"
TERMINAL_PREFIXES = {
    "done": TaskState.DONE,
    "failed": TaskState.FAILED,
    "cancelled": TaskState.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class QueueName:
    """The parsed name of a queue token: ``P~S~ID~N~F``."""

    priority: int
    seq: int
    task_id: str
    attempt: int
    agent_filter: str  # ANY_AGENT or a spec name

    def __str__(self) -> str:
        return (
            f"{self.priority:09d}{SEP}{self.seq:016d}{SEP}{self.task_id}{SEP}"
            f"{self.attempt}{SEP}{self.agent_filter}"
        )

    @property
    def sort_key(self) -> tuple[int, int, str]:
        return (self.priority, self.seq, self.task_id)

    def accepts(self, spec_name: str) -> bool:
        return self.agent_filter in (ANY_AGENT, spec_name)

    def next_attempt(self) -> QueueName:
        return QueueName(
            self.priority, self.seq, self.task_id, self.attempt + 1, self.agent_filter
        )

    @classmethod
    def parse(cls, name: str) -> Self | None:
        parts = name.split(SEP)
        if len(parts) != 5:
            return None
        try:
            return cls(int(parts[0]), int(parts[1]), parts[2], int(parts[3]), parts[4])
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class ClaimName:
    """The parsed name of a claim token: ``P~S~ID~N~F~AGENT``."""

    queue: QueueName
    agent_id: str

    def __str__(self) -> str:
        return f"{self.queue}{SEP}{self.agent_id}"

    @property
    def task_id(self) -> str:
        return self.queue.task_id

    @property
    def attempt(self) -> int:
        return self.queue.attempt

    @classmethod
    def parse(cls, name: str) -> Self | None:
        head, sep, agent_id = name.rpartition(SEP)
        queue = QueueName.parse(head) if sep else None
        if queue is None or not agent_id:
            return None
        return cls(queue, agent_id)


class SpoolLayout:
    """Paths of one spool directory. Creates nothing until :meth:`ensure` is called."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.queue = root / "queue"
        self.claims = root / "claims"
        self.tasks = root / "tasks"
        self.agents = root / "agents"
        self.rejected = root / "rejected"
        self.daemon_lock = root / "daemon.lock"
        self.daemon_report = root / "daemon.json"

    def ensure(self) -> Self:
        for path in (self.queue, self.claims, self.tasks, self.agents, self.rejected):
            path.mkdir(parents=True, exist_ok=True)
        return self

    def task_dir(self, task_id: str) -> Path:
        return self.tasks / task_id

    def queue_path(self, name: QueueName) -> Path:
        return self.queue / str(name)

    def claim_path(self, name: ClaimName) -> Path:
        return self.claims / str(name)

    def terminal_path(self, task_id: str, state: str, attempt: int) -> Path:
        return self.tasks / task_id / f"{state}{SEP}{attempt}"

    def result_path(self, task_id: str, attempt: int) -> Path:
        return self.tasks / task_id / f"result{SEP}{attempt}.json"

    def partial_path(self, task_id: str, attempt: int) -> Path:
        return self.tasks / task_id / f"out{SEP}{attempt}.part"

    def attempts_log(self, task_id: str) -> Path:
        return self.tasks / task_id / "attempts.jsonl"

    def envelope_path(self, task_id: str) -> Path:
        return self.tasks / task_id / "task.json"

    def lease_path(self, agent_id: str) -> Path:
        return self.agents / f"{agent_id}.lock"

    def children_path(self, agent_id: str) -> Path:
        return self.agents / f"{agent_id}.children"

    def list_queue(self) -> list[QueueName]:
        names = [QueueName.parse(n) for n in os.listdir(self.queue)]
        return sorted((n for n in names if n is not None), key=lambda n: n.sort_key)

    def list_claims(self) -> list[ClaimName]:
        names = [ClaimName.parse(n) for n in os.listdir(self.claims)]
        return [n for n in names if n is not None]


def terminal_marker(filename: str) -> tuple[TaskState, int] | None:
    """``(DONE, 3)`` for ``done~3``; None for any other file in a task directory."""
    state, sep, attempt = filename.partition(SEP)
    if not sep or state not in TERMINAL_PREFIXES or not attempt.isdigit():
        return None
    return TERMINAL_PREFIXES[state], int(attempt)
