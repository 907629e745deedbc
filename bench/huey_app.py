"""The Huey peer: a SqliteHuey with one no-op task, and a client that fills or probes it.

The consumer runs it as ``huey_consumer bench.huey_app.huey -w 2 -k process`` with
``BENCH_HUEY_DIR`` set; the database and the trace files live there. Each worker appends one
fixed-width line per task to its own trace files when the task starts and when it completes
(two small ``write`` calls, under 1% of a task's cost), which is how the benchmark counts
completions, finds duplicates and times starts, exactly as it reads the coordinator's attempt
logs. The task returns None, so nothing goes to the result store.

Client, with the same variable set:
    python -m bench.huey_app fill N          enqueue N tasks (with BENCH_HUEY_NOSYNC=1: setup)
    python -m bench.huey_app probe K GAP_MS  enqueue K tasks one at a time on an idle consumer,
                                             each after the previous one started; prints the
                                             enqueue times as JSON lines
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from huey import SqliteHuey, signals

from bench.tracefile import TraceWriter, trace_count

if not os.environ.get("BENCH_HUEY_DIR"):
    raise SystemExit("bench.huey_app: set BENCH_HUEY_DIR (where the database and traces go)")
BASE = Path(os.environ["BENCH_HUEY_DIR"])
# The consumer keeps Huey's defaults (WAL, synchronous=FULL). Only the bulk fill, which is not
# measured, turns off fsync on its own connection (BENCH_HUEY_NOSYNC=1).
NOSYNC = os.environ.get("BENCH_HUEY_NOSYNC") == "1"
huey = SqliteHuey("bench", filename=str(BASE / "huey.db"), fsync=False if NOSYNC else None)

_trace = TraceWriter(BASE)


@huey.task()
def noop(index: int) -> None:
    return None


@huey.signal(signals.SIGNAL_EXECUTING)
def _started(signal: str, task: Any, *args: Any) -> None:
    _trace.write("s", task.args[0])


@huey.signal(signals.SIGNAL_COMPLETE)
def _completed(signal: str, task: Any, *args: Any) -> None:
    _trace.write("c", task.args[0])


def _probe(task: Any, count: int, gap_ms: float) -> None:
    rng = random.Random(7)
    for index in range(count):
        started_before = trace_count(BASE, "c")
        at = time.time()
        task(index)
        print(json.dumps({"index": index, "enqueued": at}), flush=True)
        deadline = time.monotonic() + 30
        while trace_count(BASE, "c") <= started_before and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(gap_ms, 2 * gap_ms) / 1000)


def main() -> None:
    # Run as a script this module is __main__; the consumer knows the task by its importable
    # name (bench.huey_app.noop), so enqueue through that module.
    from bench import huey_app

    command = sys.argv[1]
    if command == "fill":
        for index in range(int(sys.argv[2])):
            huey_app.noop(index)
    elif command == "probe":
        _probe(huey_app.noop, int(sys.argv[2]), float(sys.argv[3]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
