"""Hostile task files against a real daemon (DESIGN guarantee 6).

The static corpus (tests/corpus/hostile) plus entries that cannot live in git (links, a FIFO, a
socket, an unreadable file, oversize files, a file that never stops growing, names that are not
UTF-8 or too long) are dropped among good tasks. Each hostile one must end in ``rejected/`` with
a reason that names it and says what is wrong; every good one must complete; the daemon must stay
up, log no traceback, and never read through a link.
"""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from coordinator.states import TaskState
from coordinator.store.rebuild import rejected_name
from coordinator.views import task_view
from tests.corpus import HOSTILE_DIR, hostile_corpus
from tests.support import Home, wait_until

MAX_TASK_BYTES = 16_384  # above the corpus's largest file (huge-integer.*, ~4.4 kB)
MAX_PROMPT_CHARS = 2_000
# Corpus files also written straight into tasks.d (create, write, close) rather than renamed in,
# so that intake takes them on inotify's close-write.
IN_PLACE = ("syntax-unclosed-string.toml", "unknown-key.json", "nul-bytes.toml",
            "unclosed-front-matter.md", "duplicate-key.json")
LONG_NAME = "n" * 200 + ".toml"  # "STAMP-" + it + ".reason" would exceed NAME_MAX
NOT_UTF8_NAME = os.fsdecode(b"latin1-\xe9t\xe9.toml")


@dataclass
class Scenario:
    home: Home
    outside: Path
    # name as shown in rejected/ -> a substring its reason must contain
    expected: dict[str, str] = field(default_factory=dict)
    # task id -> its prompt, which the echo backend returns as the output
    good: dict[str, str] = field(default_factory=dict)
    actions: list[Callable[[], None]] = field(default_factory=list)

    def hostile(self, shown: str, reason: str, make: Callable[[], None]) -> None:
        assert shown not in self.expected
        self.expected[shown] = reason
        self.actions.append(make)


class GrowingWriter(threading.Thread):
    """Creates a task file in place and appends to it every few ms, never closing it."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()
        self.started_writing = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b'prompt = """\n')
            self.started_writing.set()
            # One byte per 5 ms: it outgrows settle_timeout long before max_task_bytes.
            while not self.stop.wait(0.005):
                os.write(fd, b"a")
        finally:
            os.close(fd)


def write_in_place(path: Path, data: bytes) -> None:
    """Create, write in two steps, close: a writer that does not use a rename."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        half = len(data) // 2
        os.write(fd, data[:half])
        os.write(fd, data[half:])
    finally:
        os.close(fd)


def outside_the_spool(home: Home) -> Path:
    outside = home.root.parent / "outside"
    outside.mkdir()
    return outside


def atime_is_tracked(directory: Path) -> bool:
    """Whether reading a file whose atime is older than its mtime updates it (relatime)."""
    probe = directory / "atime-probe"
    probe.write_bytes(b"probe")
    os.utime(probe, ns=(1_000_000_000, probe.stat().st_mtime_ns))
    probe.read_bytes()
    return probe.stat().st_atime_ns != 1_000_000_000


def add_good_tasks(sc: Scenario) -> None:
    home = sc.home

    def good(task_id: str, prompt: str, name: str, data: bytes, in_place: bool = False) -> None:
        sc.good[task_id] = prompt
        if in_place:
            sc.actions.append(lambda: write_in_place(home.tasks / name, data))
        else:
            sc.actions.append(lambda: home.drop(name, data))

    for i in range(4):
        prompt = f"good toml task number {i}"
        good(f"good-{i:02d}", prompt, f"good-{i:02d}.toml",
             f'prompt = "{prompt}"\npriority = {i}\n'.encode())
    prompt = "good json task with an emoji \U0001f600"
    good("good-json", prompt, "good-json.json",
         b'{"prompt": "good json task with an emoji \\ud83d\\ude00", "priority": 5}')
    good("good-md", "A markdown body.\n\nTwo paragraphs.", "good-md.md",
         b'+++\npriority = 7\nlabels = { kind = "md" }\n+++\nA markdown body.\n\nTwo paragraphs.\n')
    good("good-plain-md", "A plain markdown prompt", "good-plain-md.md",
         b"A plain markdown prompt\n")
    good("good-crlf", "Written on Windows", "good-crlf.md",
         b"+++\r\npriority = 2\r\n+++\r\nWritten on Windows\r\n")
    good("good-bom", "UTF-8 with a BOM, \u00e9t\u00e9", "good-bom.toml",
         '\ufeffprompt = "UTF-8 with a BOM, \u00e9t\u00e9"\n'.encode())
    good("good-explicit-id", "an id key wins over the stem", "a stem that is not an id.toml",
         b'id = "good-explicit-id"\nprompt = "an id key wins over the stem"\n')
    good("good.v2", "dots in the stem", "good.v2.toml", b'prompt = "dots in the stem"\n')
    long_id = "g" * 128
    good(long_id, "the longest id", f"{long_id}.toml", b'prompt = "the longest id"\n')
    good("good-max-prompt", "p" * MAX_PROMPT_CHARS, "good-max-prompt.md",
         b"p" * MAX_PROMPT_CHARS)
    for i in range(3):
        prompt = f"written in place number {i}"
        good(f"good-in-place-{i}", prompt, f"good-in-place-{i}.toml",
             f'prompt = "{prompt}"\n'.encode(), in_place=True)


def add_static_corpus(sc: Scenario) -> None:
    home = sc.home
    for name, reason in hostile_corpus().items():
        data = (HOSTILE_DIR / name).read_bytes()
        sc.hostile(name, reason, lambda name=name, data=data: home.drop(name, data))
    for name in IN_PLACE:
        data = (HOSTILE_DIR / name).read_bytes()
        copy = f"in-place-{name}"
        sc.hostile(copy, hostile_corpus()[name],
                   lambda copy=copy, data=data: write_in_place(home.tasks / copy, data))


def add_generated(sc: Scenario) -> None:
    home, tasks, outside = sc.home, sc.home.tasks, sc.outside
    secret = outside / "secret.toml"
    secret.write_bytes(b'prompt = "a valid task outside the spool"\n')
    link = "symbolic link; the daemon never follows links"
    sc.hostile("link-outside.toml", link,
               lambda: os.symlink(secret, tasks / "link-outside.toml"))
    sc.hostile("link-passwd.toml", link,
               lambda: os.symlink("/etc/passwd", tasks / "link-passwd.toml"))
    sc.hostile("link-dir.toml", link, lambda: os.symlink("/etc", tasks / "link-dir.toml"))
    sc.hostile("link-dangling.json", link,
               lambda: os.symlink(outside / "missing.json", tasks / "link-dangling.json"))
    sc.hostile("link-relative.toml", link,
               lambda: os.symlink("../coordinator.toml", tasks / "link-relative.toml"))
    sc.hostile("fifo.toml", "it is a FIFO; a task is a regular file",
               lambda: os.mkfifo(tasks / "fifo.toml"))

    def make_socket() -> None:
        # Relative to the working directory (tmp_path): AF_UNIX paths are limited to 108 bytes.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(os.path.relpath(tasks / "socket.toml"))

    sc.hostile("socket.toml", "it is not a regular file", make_socket)

    def make_unreadable() -> None:
        staged = home.root / "staged-unreadable.toml"
        staged.write_bytes(b'prompt = "you cannot read me"\n')
        staged.chmod(0)
        os.rename(staged, tasks / "unreadable.toml")

    sc.hostile("unreadable.toml", "it has no read permission (mode ----------)", make_unreadable)
    huge = b'prompt = "' + b"h" * (4 * MAX_TASK_BYTES) + b'"\n'
    sc.hostile("huge.toml", f"bytes, over the limit of {MAX_TASK_BYTES}",
               lambda: home.drop("huge.toml", huge))
    long_prompt = b'prompt = "' + b"p" * (MAX_PROMPT_CHARS + 1) + b'"\n'
    sc.hostile("huge-prompt.toml",
               f"prompt is {MAX_PROMPT_CHARS + 1} characters, over the limit of {MAX_PROMPT_CHARS}",
               lambda: home.drop("huge-prompt.toml", long_prompt))
    not_an_id = "is not a valid task id"
    valid = b'prompt = "valid content, invalid name"\n'
    for name in ("a b.toml", "-rf.toml", "caf\u00e9.toml", "two\nlines.toml", "x~y.json"):
        content = b'{"prompt": "x"}' if name.endswith(".json") else valid
        sc.hostile(name, not_an_id, lambda name=name, content=content: home.drop(name, content))
    sc.hostile("latin1-\\xe9t\\xe9.toml", not_an_id,
               lambda: (tasks / NOT_UTF8_NAME).write_bytes(valid))
    shortened = LONG_NAME[:157] + "..."
    sc.hostile(shortened, not_an_id, lambda: home.drop(LONG_NAME, valid))

    def make_directory() -> None:
        # Named like a task; it must be left alone, and so must the file inside it.
        (tasks / "dir-task.toml").mkdir()
        (tasks / "dir-task.toml" / "inner.toml").write_bytes(b'prompt = "not dropped"\n')

    sc.actions.append(make_directory)


def rejected_entries(home: Home) -> dict[str, str]:
    """Name as dropped (shown form) -> reason file text, for every file in rejected/."""
    directory = home.spool.layout.rejected
    out: dict[str, str] = {}
    for entry in os.listdir(directory):
        if entry.startswith(".") or entry.endswith(".reason"):
            continue
        name = rejected_name(entry)
        assert name not in out, f"{name} rejected twice"
        out[name] = (directory / f"{entry}.reason").read_text("utf-8")
    return out


def rejected_path(home: Home, shown: str) -> Path:
    directory = home.spool.layout.rejected
    [entry] = [e for e in os.listdir(directory)
               if not e.endswith(".reason") and rejected_name(e) == shown]
    return directory / entry


@pytest.fixture
def hostile_home(tmp_path: Path) -> Iterator[Home]:
    h = Home(tmp_path / "home", max_task_bytes=MAX_TASK_BYTES, max_prompt_chars=MAX_PROMPT_CHARS)
    try:
        yield h
    finally:
        h.stop_all()


@pytest.mark.timeout(90)
def test_hostile_files_are_rejected_and_good_tasks_complete(hostile_home: Home) -> None:
    home = hostile_home
    home.echo_spec(processes=2, concurrency=2)
    daemon = home.start_daemon()
    home.wait_daemon_ready()

    sc = Scenario(home, outside_the_spool(home))
    add_good_tasks(sc)
    add_static_corpus(sc)
    add_generated(sc)
    assert len(sc.expected) >= 30 and len(sc.good) >= 10
    secret = sc.outside / "secret.toml"
    secret_bytes, secret_mtime = secret.read_bytes(), secret.stat().st_mtime_ns
    watch_atime = atime_is_tracked(sc.outside)
    os.utime(secret, ns=(1_000_000_000, secret_mtime))  # any read from now on moves it
    # Ignored names stay where they are: neither taken nor rejected.
    (home.tasks / "README.md").write_text("How to write a task.\n")
    (home.tasks / ".draft.toml").write_text('prompt = "not finished"\n')

    growing = GrowingWriter(home.tasks / "growing.toml")
    sc.expected["growing.toml"] = "the file was still being written after"
    growing.start()
    try:
        assert growing.started_writing.wait(10)
        random.Random(6).shuffle(sc.actions)  # good and hostile interleaved, reproducibly
        for action in sc.actions:
            action()
        for task_id in sc.good:
            home.wait_state(task_id, TaskState.DONE, timeout=30)
        wait_until(lambda: set(rejected_entries(home)) >= set(sc.expected), 30,
                   "every hostile file rejected")
    finally:
        growing.stop.set()
        growing.join(10)

    # Second wave, against tasks now done: a different task reusing a done task's id, and a hard
    # link to a task's envelope inside the spool.
    home.drop("id-reuse.toml", b'id = "good-00"\nprompt = "a different task"\n')
    sc.expected["id-reuse.toml"] = "a different task with id 'good-00' already exists"
    os.link(home.spool.layout.envelope_path("good-01"), home.tasks / "envelope-link.json")
    sc.expected["envelope-link.json"] = "unknown key 'task'"
    wait_until(lambda: set(rejected_entries(home)) >= set(sc.expected), 20, "second wave")

    check_rejections(sc)
    check_good_tasks(sc)
    check_special_files(sc)
    link = rejected_path(home, "link-outside.toml")
    assert link.is_symlink() and os.readlink(link) == str(secret)
    if watch_atime:
        assert secret.stat().st_atime_ns == 1_000_000_000, "the link's target was read"
    assert (secret.read_bytes(), secret.stat().st_mtime_ns) == (secret_bytes, secret_mtime)
    assert daemon.poll() is None
    check_daemon_reports(sc)


def check_rejections(sc: Scenario) -> None:
    """Every hostile file is in rejected/ with a reason that names it and says what is wrong;
    nothing else is there, and nothing hostile is left in tasks.d."""
    home = sc.home
    reasons = rejected_entries(home)
    assert set(reasons) == set(sc.expected)
    for shown, needle in sc.expected.items():
        assert reasons[shown].startswith(f"{shown}: "), reasons[shown]
        assert needle in reasons[shown], f"{shown}: {reasons[shown]!r} lacks {needle!r}"
    # The directory and the ignored names are untouched.
    assert sorted(os.listdir(home.tasks)) == [".draft.toml", "README.md", "dir-task.toml"]
    assert os.listdir(home.tasks / "dir-task.toml") == ["inner.toml"]


def check_good_tasks(sc: Scenario) -> None:
    """Every good task completed with the right output, and no other task was ever accepted."""
    home = sc.home
    for task_id, prompt in sc.good.items():
        view = task_view(home.settings, task_id)
        assert view.state is TaskState.DONE
        assert view.output == prompt, task_id
    assert sorted(os.listdir(home.spool.layout.tasks)) == sorted(sc.good)
    # The id reuse changed nothing; the hard link was moved aside, the envelope kept.
    assert task_view(home.settings, "good-00").output == "good toml task number 0"
    assert home.spool.layout.envelope_path("good-01").stat().st_nlink == 2


def check_special_files(sc: Scenario) -> None:
    """Special files were moved aside as they were, never opened."""
    home = sc.home
    assert stat.S_ISFIFO(os.lstat(rejected_path(home, "fifo.toml")).st_mode)
    assert stat.S_ISSOCK(os.lstat(rejected_path(home, "socket.toml")).st_mode)
    unreadable = rejected_path(home, "unreadable.toml")
    assert stat.S_IMODE(unreadable.stat().st_mode) == 0
    if os.geteuid() == 0:  # only root can check that its content was kept
        assert unreadable.read_bytes() == b'prompt = "you cannot read me"\n'
    assert rejected_path(home, "latin1-\\xe9t\\xe9.toml").read_bytes().startswith(b"prompt")


def check_daemon_reports(sc: Scenario) -> None:
    """Status says the daemon runs and counts every task; show explains a rejection; the log
    has no traceback."""
    home = sc.home
    last: dict[str, Any] = {}

    def status_counts_everything() -> dict[str, Any] | None:
        # The record may trail the spool by a moment: an agent records DONE after the fence.
        status = home.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        last.update(json.loads(status.stdout))
        counts = last["counts"]
        done = (counts["done"], counts["rejected"]) == (len(sc.good), len(sc.expected))
        return last if done else None

    try:
        report = wait_until(status_counts_everything, 10, "status counting every task")
    except AssertionError:
        pytest.fail(f"status counts {last.get('counts')}, expected {len(sc.good)} done and "
                    f"{len(sc.expected)} rejected")
    assert report["daemon"]["running"] is True
    shown = home.cli_json("show", "id-dotdot")
    assert shown["state"] == "rejected"
    assert shown["source"] == "id-dotdot.toml"
    assert "id '../x' is not valid" in shown["reason"]
    fifo = home.cli_json("show", "fifo")
    assert (fifo["state"], fifo["reason"]) == ("rejected", sc.expected["fifo.toml"] + ".")
    assert "Traceback" not in home.log_text()
