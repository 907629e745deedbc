"""Task states and the allowed transitions between them (stdlib only).

In the file spool a task's state *is* the place of its one token file (see ``spool/layout.py``);
this module is the table that every move of a token is checked against, so a bug that tries an
impossible edge fails loudly instead of corrupting the spool.
"""

from __future__ import annotations

import enum


class TaskState(enum.StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED, TaskState.REJECTED})

# Every edge a task may take. REJECTED has no edges: a rejected file never became a task.
TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.QUEUED: frozenset({TaskState.CLAIMED, TaskState.CANCELLED}),
    TaskState.CLAIMED: frozenset(
        # DONE: completed; QUEUED: reclaimed/released/failed attempt with attempts left;
        # FAILED: out of attempts; CANCELLED: cancelled while running.
        {TaskState.DONE, TaskState.QUEUED, TaskState.FAILED, TaskState.CANCELLED}
    ),
    TaskState.DONE: frozenset({TaskState.QUEUED}),  # retry
    TaskState.FAILED: frozenset({TaskState.QUEUED}),  # retry
    TaskState.CANCELLED: frozenset({TaskState.QUEUED}),  # retry
    TaskState.REJECTED: frozenset(),
}


class AttemptOutcome(enum.StrEnum):
    """How one attempt ended."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # the pipeline or backend failed; counts against max_attempts
    TIMEOUT = "timeout"  # the task's timeout passed; counts against max_attempts
    CRASHED = "crashed"  # the agent died holding the claim; counts against max_attempts
    STALLED = "stalled"  # the agent stopped heartbeating and was stopped; counts
    RELEASED = "released"  # the agent shut down gracefully and gave the task back; does not count
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"  # finished after its claim had been taken away; result discarded

    @property
    def counts_against_budget(self) -> bool:
        return self in {
            AttemptOutcome.FAILED,
            AttemptOutcome.TIMEOUT,
            AttemptOutcome.CRASHED,
            AttemptOutcome.STALLED,
        }


def check_transition(src: TaskState, dst: TaskState) -> None:
    """Raise ``ValueError`` unless ``src -> dst`` is an allowed edge."""
    if dst not in TRANSITIONS[src]:
        raise ValueError(f"illegal task state transition {src} -> {dst}")
