"""The peers measured in the same run: Huey's SqliteHuey consumer and a bare rename loop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import Procs, RssSampler, child_env, go, in_ms, python, reap, wait_for
from bench.tracefile import read_trace, trace_count

WORKERS = 2


def _huey_env(base: Path, nosync: bool) -> dict[str, str]:
    env = child_env()
    env["BENCH_HUEY_DIR"] = str(base)
    if nosync:
        env["BENCH_HUEY_NOSYNC"] = "1"
    return env


def _consumer(procs: Procs, base: Path, nosync: bool) -> subprocess.Popen[bytes]:
    """``huey_consumer bench.huey_app.huey -w 2 -k process`` with Huey's default polling."""
    argv = [python(), "-m", "huey.bin.huey_consumer", "bench.huey_app.huey",
            "-w", str(WORKERS), "-k", "process"]
    with open(base / "consumer.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=base, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, env=_huey_env(base, nosync))
    procs.procs.append(proc)
    return proc


def _stop_consumer(procs: Procs, proc: subprocess.Popen[bytes]) -> float | None:
    """Stop the consumer gracefully; the CPU seconds it and its workers used."""
    return procs.stop(proc, timeout=30, sig=signal.SIGINT)[1]  # huey's graceful signal


def huey_drain(base: Path, count: int, *, nosync: bool = False) -> dict[str, Any]:
    """Enqueue ``count`` no-op tasks, then start a 2-worker consumer and time the drain.

    The rate is counted from the first task's start to the last task's completion, read from
    the workers' trace files, like the coordinator's from its attempt logs.
    """
    base.mkdir(parents=True)
    procs = Procs()
    sampler = RssSampler().start()
    try:
        subprocess.run([python(), "-m", "bench.huey_app", "fill", str(count)], check=True,
                       env=_huey_env(base, nosync=True), cwd=base)
        released = time.time()
        consumer = _consumer(procs, base, nosync)
        time.sleep(0.3)
        sampler.watch("consumer", consumer.pid, with_children=True)
        wait_for(lambda: trace_count(base, "c") >= count, 120 + count / 50,
                 "the huey consumer to drain", interval=0.05)
        time.sleep(0.2)  # a duplicate would show up now
        cpu = _stop_consumer(procs, consumer)
        starts = read_trace(base, "s")
        ends = read_trace(base, "c")
        counted = Counter(i for i, _ in ends)
        first = min(t for _, t in starts)
        last = max(t for _, t in ends)
        check = {
            "submitted": count,
            "done": len(counted),
            "lost": count - len(set(counted) & set(range(count))),
            "duplicates": sum(1 for c in counted.values() if c > 1),
        }
        return {
            "n": count,
            "fsync": not nosync,
            "seconds": last - first,
            "rate": count / (last - first),
            "rate_from_release": count / (last - released),
            "rss_peak": sampler.peak.get("consumer", 0),
            "cpu_seconds": cpu,  # the consumer and its workers, start-up and idle polls included
            "cpu_ms_per_task": None if cpu is None else 1000 * cpu / count,
            "check": check,
            "clean": check["done"] == count and not check["lost"] and not check["duplicates"],
        }
    finally:
        sampler.stop()
        procs.stop_all()


def huey_latency(base: Path, samples: int, gap_ms: float) -> dict[str, Any]:
    """Enqueue one task at a time into an idle 2-worker consumer; enqueue -> start signal."""
    base.mkdir(parents=True)
    procs = Procs()
    try:
        consumer = _consumer(procs, base, nosync=False)
        time.sleep(1.0)  # consumer and workers up
        probe = subprocess.run(
            [python(), "-m", "bench.huey_app", "probe", str(samples), str(gap_ms)],
            check=True, capture_output=True, env=_huey_env(base, nosync=False), cwd=base,
            timeout=60 + samples * 30,
        )
        time.sleep(0.2)
        _stop_consumer(procs, consumer)
        enqueued = {r["index"]: r["enqueued"] for r in map(json.loads, probe.stdout.splitlines())}
        started = dict(read_trace(base, "s"))
        latencies = [started[i] - t0 for i, t0 in enqueued.items() if i in started]
        return {
            "samples": samples,
            "gap_ms": gap_ms,
            "enqueue_to_start_ms": in_ms(latencies),
            "missing": len(enqueued) - len(latencies),
        }
    finally:
        procs.stop_all()


def rename_loop(base: Path, count: int) -> dict[str, Any]:
    """Two workers claim and complete ``count`` tokens with two renames each; nothing else."""
    queue, claims, done = base / "queue", base / "claims", base / "done"
    for path in (queue, claims, done):
        path.mkdir(parents=True)
    for i in range(count):
        name = f"{100:09d}~{i:016d}~b{i:07d}~1~_"
        os.close(os.open(queue / name, os.O_CREAT | os.O_EXCL, 0o644))
    procs = Procs()
    try:
        runners = [
            procs.start([python(), "-m", "bench.launch", "rename-loop", str(queue), str(claims),
                         str(done), f"w{k}"], base / f"worker-{k}.log", stdin=True,
                        stdout=subprocess.PIPE)
            for k in range(WORKERS)
        ]
        for runner in runners:
            assert runner.stdout is not None
            if runner.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"rename loop launcher failed; see {base}")
        released = go(runners)
        reports, cpu = [], 0.0
        for runner in runners:
            assert runner.stdout is not None
            reports.append(json.loads(runner.stdout.readline()))
            cpu += reap(runner, 60)[1] or 0.0
        first = min(r["first"] for r in reports if r["completed"])
        last = max(r["last"] for r in reports)
        completed = sum(r["completed"] for r in reports)
        done_names = os.listdir(done)
        check = {
            "submitted": count,
            "done": len(done_names),
            "lost": count - len(done_names),
            "duplicates": completed - len(done_names),
            "left_queued": len(os.listdir(queue)),
            "left_claimed": len(os.listdir(claims)),
        }
        return {
            "n": count,
            "seconds": last - first,
            "rate": count / (last - first),
            "rate_from_release": count / (last - released),
            "per_worker": [r["completed"] for r in reports],
            "cpu_ms_per_task": 1000 * cpu / count,
            "check": check,
            "clean": check["done"] == count and not any(
                check[k] for k in ("lost", "duplicates", "left_queued", "left_claimed")),
        }
    finally:
        procs.stop_all()
        shutil.rmtree(base, ignore_errors=True)
