"""Intake against hostile names and writers, driven by hand (no watcher thread, no daemon).

Most tests here once failed: a file name that is not UTF-8 or is too long to stamp raised in
``_reject`` on every pass, an unexpected error on one file stopped every other file, a file seen
twice a millisecond apart was read half-written, and a task an agent finished before intake wrote
its record was recorded as queued for good.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.daemon import intake as intake_module
from coordinator.daemon.intake import Intake
from coordinator.errors import TaskFileError
from coordinator.models import Task
from coordinator.spool.filespool import Accepted, SeqClock, Submission
from coordinator.states import TaskState
from coordinator.store import Store
from coordinator.store.rebuild import rejected_name
from tests.support import Home, wait_until


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home", settle_timeout=0.5)


@pytest.fixture
def store(home: Home) -> Iterator[Store]:
    with Store(home.settings.db_file) as s:
        yield s


@pytest.fixture
def intake(home: Home, store: Store) -> Intake:
    return Intake(home.settings, home.spool, store)


def backdate(directory: Path) -> None:
    """Make the files look as if they were there, quiet, before the daemon started (at start-up
    intake takes at once only files that have not changed for QUIET_PERIOD)."""
    past = time.time() - 60
    for name in os.listdir(directory):
        os.utime(directory / name, (past, past), follow_symlinks=False)


def rejected(home: Home) -> dict[str, str]:
    """Rejected name as dropped (stamp removed) -> its reason file's text."""
    directory = home.spool.layout.rejected
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".reason") or name.startswith("."):
            continue
        out[rejected_name(name)] = (directory / f"{name}.reason").read_text("utf-8")
    return out


def test_a_file_name_that_is_not_utf8_is_rejected_and_blocks_nothing(
    home: Home, intake: Intake, store: Store
) -> None:
    bad = os.fsdecode(b"caf\xe9.toml")
    (home.tasks / bad).write_bytes(b'prompt = "x"\n')
    (home.tasks / "good.toml").write_bytes(b'prompt = "fine"\n')
    backdate(home.tasks)
    intake.rescan(initial=True)
    intake.process()
    assert home.state("good") is TaskState.QUEUED
    reasons = rejected(home)
    assert set(reasons) == {"caf\\xe9.toml"}
    assert reasons["caf\\xe9.toml"].startswith("caf\\xe9.toml: the file name")
    assert "is not a valid task id" in reasons["caf\\xe9.toml"]
    assert os.listdir(home.tasks) == []
    assert store.counts_by_state()["rejected"] == 1


def test_a_file_name_too_long_to_stamp_is_rejected_under_a_shortened_name(
    home: Home, intake: Intake
) -> None:
    long_name = "n" * 240 + ".toml"  # fits NAME_MAX; "STAMP-" + it + ".reason" does not
    (home.tasks / long_name).write_bytes(b'prompt = "x"\n')
    backdate(home.tasks)
    intake.rescan(initial=True)
    intake.process()
    [(shown, reason)] = rejected(home).items()
    assert shown.startswith("n" * 100) and shown.endswith("...")
    assert "is not a valid task id" in reason
    assert os.listdir(home.tasks) == []
    # Nothing is lost: the rejected file still holds what was dropped.
    [kept] = [p for p in home.spool.layout.rejected.iterdir() if not p.name.endswith(".reason")]
    assert kept.read_bytes() == b'prompt = "x"\n'


def test_an_unexpected_error_on_one_file_does_not_stop_the_others(
    home: Home, intake: Intake, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_parse = intake_module.parse_task

    def parse(filename: str, data: bytes, max_prompt_chars: int = 500_000) -> Task:
        if filename == "boom.toml":
            raise RuntimeError("a bug in the parser")
        return real_parse(filename, data, max_prompt_chars)

    monkeypatch.setattr(intake_module, "parse_task", parse)
    for name in ("boom.toml", "after.toml"):
        (home.tasks / name).write_bytes(b'prompt = "x"\n')
    backdate(home.tasks)
    intake.rescan(initial=True)
    with caplog.at_level(logging.ERROR):
        intake.process()
    assert home.state("after") is TaskState.QUEUED
    assert os.listdir(home.tasks) == ["boom.toml"]  # kept, to be looked at again
    assert "examining boom.toml failed" in caplog.text


def test_a_file_being_written_is_not_read_between_two_quick_looks(
    home: Home, intake: Intake
) -> None:
    path = home.tasks / "slow.toml"
    with open(path, "wb", buffering=0) as f:
        intake._on_event("slow.toml", "create")  # what the watcher reports for the open
        f.write(b'prompt = "half')
        intake.process()
        intake.process()  # a millisecond later: unchanged, but not for long enough
        assert os.listdir(home.tasks) == ["slow.toml"]
        assert rejected(home) == {}
        f.write(b' and half"\n')
    intake._on_event("slow.toml", "close_write")
    intake.process()
    assert home.spool.read_envelope("slow").task.prompt == "half and half"


def test_a_file_seen_only_by_a_listing_is_taken_once_it_held_still(
    home: Home, intake: Intake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake_module, "QUIET_PERIOD", 0.05)
    (home.tasks / "listed.toml").write_bytes(b'prompt = "x"\n')
    intake.rescan()  # a periodic rescan, not start-up: no event says it is complete
    intake.process()
    assert home.state("listed") is None
    wait_until(lambda: intake.process() and home.state("listed") is TaskState.QUEUED, 5,
               "listed.toml accepted once quiet")


def test_a_file_that_keeps_growing_is_rejected_after_settle_timeout(
    home: Home, intake: Intake
) -> None:
    path = home.tasks / "growing.toml"
    with open(path, "wb", buffering=0) as f:
        intake._on_event("growing.toml", "create")
        f.write(b'prompt = """')

        def grow_and_look() -> bool:
            f.write(b"a")
            intake.process()
            return not path.exists()

        wait_until(grow_and_look, 10, "growing.toml rejected")
    [(name, reason)] = rejected(home).items()
    assert name == "growing.toml"
    assert "still being written" in reason


def test_task_file_errors_reach_the_reason_file_verbatim(home: Home, intake: Intake) -> None:
    (home.tasks / "bad.json").write_bytes(b'{"prompt": "x", "prompt": "y"}')
    backdate(home.tasks)
    intake.rescan(initial=True)
    intake.process()
    with pytest.raises(TaskFileError) as caught:
        intake_module.parse_task("bad.json", b'{"prompt": "x", "prompt": "y"}')
    assert rejected(home) == {"bad.json": f"bad.json: {caught.value.message}\n"}


def test_a_task_finished_before_intake_records_it_stays_done_in_the_record(
    home: Home, intake: Intake, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_accept = intake.spool.accept

    def accept_then_finish(batch: list[Submission], clock: SeqClock) -> list[Accepted]:
        outcomes = real_accept(batch, clock)
        for sub in batch:  # a fast agent: claimed and done before intake writes its record
            store.record_state(sub.task.id, TaskState.DONE)
        return outcomes

    monkeypatch.setattr(intake.spool, "accept", accept_then_finish)
    (home.tasks / "quick.toml").write_bytes(b'prompt = "x"\n')
    backdate(home.tasks)
    intake.rescan(initial=True)
    intake.process()
    counts = store.counts_by_state()
    assert (counts["done"], counts["queued"]) == (1, 0)
    [row] = store.list_tasks()
    assert (row["id"], row["priority"], row["source"]) == ("quick", 100, "quick.toml")


def test_at_start_up_a_file_changed_just_now_is_not_read_yet(
    home: Home, intake: Intake
) -> None:
    # It may be a file being written in place while the daemon restarts: reading it now could
    # take half of it. Only a file quiet for QUIET_PERIOD is taken at once.
    (home.tasks / "fresh.toml").write_bytes(b'prompt = "half wr')
    intake.rescan(initial=True)
    intake.process()
    assert home.state("fresh") is None
    assert os.listdir(home.tasks) == ["fresh.toml"]
    (home.tasks / "fresh.toml").write_bytes(b'prompt = "whole"\n')
    backdate(home.tasks)
    intake.rescan(initial=True)
    intake.process()
    assert home.state("fresh") is TaskState.QUEUED
