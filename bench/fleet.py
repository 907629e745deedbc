"""The coordinator's scenarios: intake burst, drain, idle latency, on real daemon and agents.

Every scenario builds its own home in a temporary directory and runs the real programs
(``python -m coordinator run`` / ``agent``), then reads the spool to time and verify the run:
each submitted id must have exactly one ``done~N`` token, one result, one attempt start, and
nothing may be left queued, claimed or rejected.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.harness import USAGE, Procs, RssSampler, cpu_seconds, go, in_ms, python, reap, wait_for

SPEC = """\
# The shipped agents/echo.toml with a zero token delay: the pipeline's own cost only.
backend = "echo"
processes = {processes}
concurrency = {concurrency}
system_prompt = "You are a helpful assistant."

[backend_options]
token_delay_ms = 0
"""


def prompt(i: int) -> str:
    return f"benchmark task number {i} please echo this back"


def task_id(i: int) -> str:
    return f"b{i:07d}"


class FleetHome:
    """One deployment under ``root`` with the product's default settings (no config file)."""

    def __init__(self, root: Path, procs: Procs) -> None:
        self.root = root
        self.procs = procs
        self.tasks = root / "tasks.d"
        self.spool = root / "spool"
        self.staging = root / "staging"  # same file system as tasks.d, so drops are renames
        for path in (root / "agents", self.tasks, self.staging, root / "specs"):
            path.mkdir(parents=True, exist_ok=True)
        self.daemon: subprocess.Popen[bytes] | None = None

    def spec(self, concurrency: int, processes: int, *, supervised: bool) -> Path:
        """Write the echo spec; in ``agents/`` (the daemon runs it) or aside (we run it)."""
        folder = self.root / ("agents" if supervised else "specs")
        path = folder / "echo.toml"
        path.write_text(SPEC.format(processes=processes, concurrency=concurrency))
        return path

    def coordinator(self, *args: str) -> list[str]:
        return [python(), "-m", "coordinator", "--home", str(self.root), *args]

    def start_daemon(self) -> subprocess.Popen[bytes]:
        self.daemon = self.procs.start(self.coordinator("run"), self.root / "daemon.log")
        report = self.spool / "daemon.json"
        wait_for(report.exists, 30, "the daemon's first report")
        return self.daemon

    def stop_daemon(self) -> float | None:
        """SIGTERM the daemon and reap it; returns the CPU seconds it used."""
        if self.daemon is None:
            return None
        code, cpu = self.procs.stop(self.daemon, timeout=60)
        self.daemon = None
        if code != 0:
            raise RuntimeError(f"daemon exited {code}; see {self.root / 'daemon.log'}")
        return cpu

    def stage(self, indexes: range) -> list[str]:
        names = []
        for i in indexes:
            name = f"{task_id(i)}.toml"
            (self.staging / name).write_text(f'prompt = "{prompt(i)}"\n')
            names.append(name)
        return names

    def drop(self, names: list[str]) -> float:
        """Rename staged files into tasks.d as fast as possible; returns the time it started."""
        started = time.time()
        for name in names:
            os.rename(self.staging / name, self.tasks / name)
        return started

    def queue_len(self) -> int:
        return len(os.listdir(self.spool / "queue"))

    def live_leases(self) -> int:
        agents = self.spool / "agents"
        if not agents.exists():
            return 0
        return sum(1 for n in os.listdir(agents) if n.endswith(".lock") and n[0] != ".")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def verify(home: FleetHome, count: int) -> dict[str, Any]:
    """Read back every task: done exactly once, one result, right output; collect the times."""
    tasks_root = home.spool / "tasks"
    expected = {task_id(i): i for i in range(count)}
    lost, duplicates, wrong = [], [], []
    starts, ends = [], []
    for tid, i in expected.items():
        task_dir = tasks_root / tid
        try:
            entries = os.listdir(task_dir)
        except FileNotFoundError:
            lost.append(tid)
            continue
        done = [e for e in entries if e.startswith("done~")]
        results = [e for e in entries if e.startswith("result~") and e.endswith(".json")]
        events = [json.loads(line) for line in (task_dir / "attempts.jsonl").read_bytes()
                  .splitlines()] if "attempts.jsonl" in entries else []
        task_starts = [e["at"] for e in events if e.get("event") == "start"]
        task_ends = [e["at"] for e in events if e.get("event") == "end"
                     and e.get("outcome") == "done"]
        if not done:
            lost.append(tid)
            continue
        if len(done) > 1 or len(results) > 1 or len(task_starts) > 1:
            duplicates.append(tid)
        attempt = int(done[0].split("~")[1])
        try:
            result = json.loads((task_dir / f"result~{attempt}.json").read_bytes())
        except FileNotFoundError:
            lost.append(tid)
            continue
        if result.get("task_id") != tid or result.get("output") != prompt(i):
            wrong.append(tid)
        starts.extend(task_starts[:1])
        ends.extend(task_ends[:1])
    extra = sorted(set(os.listdir(tasks_root)) - set(expected))
    return {
        "submitted": count,
        "done": count - len(lost),
        "lost": len(lost),
        "duplicates": len(duplicates),
        "wrong_output": len(wrong),
        "unexpected_ids": len(extra),
        "left_queued": len(os.listdir(home.spool / "queue")),
        "left_claimed": len(os.listdir(home.spool / "claims")),
        "rejected": len([n for n in os.listdir(home.spool / "rejected")
                         if not n.endswith(".reason")]),
        "examples": {"lost": lost[:5], "duplicates": duplicates[:5], "wrong": wrong[:5]},
        "_starts": starts,
        "_ends": ends,
    }


def clean(check: dict[str, Any]) -> bool:
    keys = ("lost", "duplicates", "wrong_output", "unexpected_ids", "left_queued",
            "left_claimed", "rejected")
    return check["done"] == check["submitted"] and not any(check[k] for k in keys)


def intake_and_drain(root: Path, count: int, *, agents: int = 2, concurrency: int = 4,
                     profile: Path | None = None, profile_flags: tuple[str, ...] = ()
                     ) -> dict[str, Any]:
    """Drop ``count`` files into an intake-only daemon, then drain them with ``agents`` agents.

    Intake is timed from the first rename into tasks.d until tasks.d is empty again (each file
    leaves it only after its task is durable). The drain is timed from releasing the agents
    (already started and imported, see ``bench.launch``) until the last durable completion.
    """
    procs = Procs()
    home = FleetHome(root, procs)
    sampler = RssSampler().start()
    out: dict[str, Any] = {"n": count, "agents": agents, "concurrency": concurrency}
    try:
        spec = home.spec(concurrency, agents, supervised=False)
        daemon = home.start_daemon()
        sampler.watch("daemon", daemon.pid)
        daemon_spy = None
        if profile is not None:  # the daemon too: intake is its busy part
            daemon_spy = procs.start([str(Path(python()).with_name("py-spy")), "record", "--pid",
                         str(daemon.pid), "--rate", "250", "--format", "raw", *profile_flags,
                         "-o", str(profile / "daemon.txt")], profile / "py-spy-daemon.log")
            time.sleep(1.0)
        names = home.stage(range(count))
        started = home.drop(names)
        dropped = time.time()
        wait_for(lambda: not os.listdir(home.tasks), 60 + count / 200, "intake",
                 interval=0.02)
        accepted = time.time()
        queued = home.queue_len()
        out["intake"] = {
            "files": count,
            "queued": queued,
            "drop_seconds": dropped - started,
            "seconds": accepted - started,
            "rate": count / (accepted - started),
            "daemon_rss_peak": sampler.peak.get("daemon", 0),
            "daemon_cpu_seconds": cpu_seconds(daemon.pid),  # includes its start-up
        }
        if queued != count:
            rejected = sorted(n for n in os.listdir(home.spool / "rejected")
                              if n.endswith(".reason"))
            first = (home.spool / "rejected" / rejected[0]).read_text() if rejected else ""
            raise RuntimeError(f"intake queued {queued} of {count}, rejected {len(rejected)} "
                               f"(first reason: {first.strip()!r}); see {home.root}")
        time.sleep(1.0)  # let the database writes of the last batches land
        out["daemon_rss_pending"] = max(sampler.sample("daemon") for _ in range(5))
        out["drain"] = _drain(home, spec, agents, sampler, procs, count, profile,
                              profile_flags)
        out["daemon_rss_peak"] = sampler.peak.get("daemon", 0)
        out["daemon_cpu_seconds"] = home.stop_daemon()
        if daemon_spy is not None:
            reap(daemon_spy, 60)  # it writes its file once the daemon is gone
        return out
    finally:
        sampler.stop()
        procs.stop_all()


def _drain(home: FleetHome, spec: Path, agents: int, sampler: RssSampler, procs: Procs,
           count: int, profile: Path | None, profile_flags: tuple[str, ...]) -> dict[str, Any]:
    argv = [python(), "-m", "bench.launch", "coordinator", "--home", str(home.root),
            "agent", "--spec", str(spec), "--exit-when-idle", "--no-reap"]
    runners = [procs.start(argv, home.root / f"agent-{k}.log", stdin=True,
                           stdout=subprocess.PIPE) for k in range(agents)]
    for runner in runners:
        assert runner.stdout is not None
        if runner.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"agent launcher failed; see {home.root}")
    spy = str(Path(python()).with_name("py-spy"))
    spies = [procs.start([spy, "record", "--pid", str(r.pid), "--rate", "250",
                          "--format", "raw", *profile_flags, "-o", str(profile / f"agent-{k}.txt")],
                         profile / f"py-spy-{k}.log")
             for k, r in enumerate(runners)] if profile is not None else []
    if spies:
        time.sleep(1.0)  # py-spy attaches
    for k, runner in enumerate(runners):
        sampler.watch(f"agent{k}", runner.pid)
    # CPU spent importing before the release is not the drain's: subtract it below.
    before = [cpu_seconds(r.pid) or 0.0 for r in runners]
    released = go(runners)
    deadline = 120 + count / 100
    cpu: list[float | None] = []
    for runner, imported in zip(runners, before, strict=True):
        code, used = reap(runner, deadline)
        if code != 0:
            raise RuntimeError(f"agent exited {code}; see {home.root}")
        cpu.append(None if used is None else used - imported)
    exited = time.time()
    for spy in spies:
        spy.wait(timeout=60)
    check = verify(home, count)
    starts, ends = sorted(check.pop("_starts")), sorted(check.pop("_ends"))
    result: dict[str, Any] = {"check": check, "clean": clean(check)}
    if ends:
        last = ends[-1]
        result.update({
            "seconds_from_release": last - released,
            "rate_from_release": count / (last - released),
            "seconds": last - starts[0],
            "rate": count / (last - starts[0]),
            "first_claim_after_release": starts[0] - released,
            "exit_after_last_done": exited - last,
        })
        head = max(1, count // 10)
        result["rate_first_10pct"] = head / (ends[head - 1] - starts[0])
        result["rate_last_10pct"] = head / (last - ends[-head - 1]) if count > head else None
    result["agent_rss_peak"] = [sampler.peak.get(f"agent{k}", 0) for k in range(agents)]
    result["agent_cpu_seconds"] = cpu
    result["agent_cpu_user_system"] = [USAGE.get(r.pid) for r in runners]
    if all(c is not None for c in cpu):
        result["cpu_ms_per_task"] = 1000 * sum(c or 0.0 for c in cpu) / count
    return result


def idle_latency(root: Path, samples: int, gap_ms: float, *, agents: int = 2,
                 concurrency: int = 4) -> dict[str, Any]:
    """Drop one task at a time into an idle fleet (daemon supervising ``agents`` agents).

    For each task: t0 just before the rename into tasks.d; the queue token's and the claim's
    appearance seen through inotify in this process; the attempt log's start record. The next
    task is dropped ``gap_ms``..``2*gap_ms`` after the previous one completed.
    """
    from coordinator.spool.watch import DirectoryWatcher

    # Closing a watcher reports its watch as deleted; that is expected here, not news.
    logging.getLogger("coordinator.spool.watch").setLevel(logging.ERROR)
    procs = Procs()
    home = FleetHome(root, procs)
    seen: dict[str, dict[str, float]] = {"queue": {}, "claims": {}}

    def watcher(kind: str) -> DirectoryWatcher:
        def on_name(name: str, _event: str) -> None:
            at = time.time()
            parts = name.split("~")
            if len(parts) >= 5:
                seen[kind].setdefault(parts[2], at)

        return DirectoryWatcher(home.spool / kind, on_name, lambda: None)

    watchers: list[DirectoryWatcher] = []
    try:
        home.spec(concurrency, agents, supervised=True)
        home.spool.mkdir(parents=True, exist_ok=True)
        for sub in ("queue", "claims"):
            (home.spool / sub).mkdir(exist_ok=True)
        watchers = [watcher("queue"), watcher("claims")]
        home.start_daemon()
        wait_for(lambda: home.live_leases() >= agents, 30, "agents to start")
        warm = 5
        for name in home.stage(range(warm)):
            home.drop([name])
        for i in range(warm):
            _wait_done(home, i)
        rng = random.Random(11)
        dropped: dict[str, float] = {}
        names = home.stage(range(warm, warm + samples))
        for k, name in enumerate(names):
            time.sleep(rng.uniform(gap_ms, 2 * gap_ms) / 1000)
            dropped[task_id(warm + k)] = time.time()
            os.rename(home.staging / name, home.tasks / name)
            _wait_done(home, warm + k)
        home.stop_daemon()
        for w in watchers:
            w.close()
        watchers = []
        claim, queued, start, end = [], [], [], []
        for tid, t0 in dropped.items():
            events = [json.loads(line) for line in
                      (home.spool / "tasks" / tid / "attempts.jsonl").read_bytes().splitlines()]
            start.append(next(e["at"] for e in events if e["event"] == "start") - t0)
            end.append(next(e["at"] for e in events if e["event"] == "end") - t0)
            if tid in seen["claims"]:
                claim.append(seen["claims"][tid] - t0)
            if tid in seen["queue"]:
                queued.append(seen["queue"][tid] - t0)
        check = verify(home, warm + samples)
        check.pop("_starts")
        check.pop("_ends")
        return {
            "samples": samples,
            "gap_ms": gap_ms,
            "drop_to_claim_ms": in_ms(claim),
            "drop_to_queued_ms": in_ms(queued),
            "drop_to_start_record_ms": in_ms(start),
            "drop_to_done_ms": in_ms(end),
            "check": check,
            "clean": clean(check),
        }
    finally:
        for w in watchers:
            w.close()
        procs.stop_all()


def _wait_done(home: FleetHome, i: int, timeout: float = 30.0) -> None:
    task_dir = home.spool / "tasks" / task_id(i)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(n.startswith("done~") for n in os.listdir(task_dir)):
                return
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_id(i)} not done after {timeout}s ({home.root})")
        time.sleep(0.001)
