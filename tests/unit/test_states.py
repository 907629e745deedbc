"""The task state machine: exactly the edges in TRANSITIONS are allowed."""

from __future__ import annotations

import itertools

import pytest

from coordinator.states import (
    TERMINAL,
    TRANSITIONS,
    AttemptOutcome,
    TaskState,
    check_transition,
)

EXPECTED_EDGES = {
    ("queued", "claimed"), ("queued", "cancelled"),
    ("claimed", "done"), ("claimed", "queued"), ("claimed", "failed"), ("claimed", "cancelled"),
    ("done", "queued"), ("failed", "queued"), ("cancelled", "queued"),
}

ALL_PAIRS = list(itertools.product(TaskState, TaskState))


def test_transition_table_is_the_documented_lifecycle() -> None:
    # A change to the table is a change to the lifecycle in DESIGN.md: make it on purpose.
    table = {(src.value, dst.value) for src, dsts in TRANSITIONS.items() for dst in dsts}
    assert table == EXPECTED_EDGES
    assert set(TRANSITIONS) == set(TaskState)


@pytest.mark.parametrize(("src", "dst"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_check_transition_allows_exactly_the_table(src: TaskState, dst: TaskState) -> None:
    if dst in TRANSITIONS[src]:
        check_transition(src, dst)
    else:
        with pytest.raises(ValueError, match=f"{src} -> {dst}"):
            check_transition(src, dst)


def test_no_self_loops_and_rejected_is_a_dead_end() -> None:
    for state in TaskState:
        with pytest.raises(ValueError):
            check_transition(state, state)
    assert TRANSITIONS[TaskState.REJECTED] == frozenset()
    assert all(TaskState.REJECTED not in dsts for dsts in TRANSITIONS.values())


def test_terminal_states() -> None:
    assert {s.value for s in TERMINAL} == {"done", "failed", "cancelled", "rejected"}
    assert [s for s in TaskState if s.terminal] == [s for s in TaskState if s in TERMINAL]
    assert not TaskState.QUEUED.terminal and not TaskState.CLAIMED.terminal
    # Only the queue leads anywhere from an ended task (retry).
    for state in TERMINAL:
        assert TRANSITIONS[state] <= {TaskState.QUEUED}


def test_states_are_plain_strings() -> None:
    assert TaskState("queued") is TaskState.QUEUED
    assert f"{TaskState.CLAIMED}" == "claimed"


def test_outcomes_that_count_against_the_attempt_budget() -> None:
    counted = {o.value for o in AttemptOutcome if o.counts_against_budget}
    assert counted == {"failed", "timeout", "crashed", "stalled"}
    # A graceful shutdown, an operator cancel, a superseded attempt or a success never
    # burns an attempt.
    for outcome in ("released", "cancelled", "superseded", "done", "running"):
        assert not AttemptOutcome(outcome).counts_against_budget
