"""Drive one role of the claim protocol with the real library, and stop at a named step.

Run as a real process by the crash tests (``python protocol_driver.py --home HOME ROLE ...``).
At the step named by ``--stop-at`` it prints one JSON line ``{"paused": STEP, ...}`` and blocks
reading stdin, so the test can SIGKILL it exactly there. If the step is never reached it runs to
the end and prints ``{"finished": true}``, which the test reports as a failure.

Nothing here is a test-only path in the product: the roles call the same functions the agent,
reaper and daemon call (``AgentLease``, ``FileSpool``, ``Pipeline``, ``Reaper``, ``Intake``). To
stop *inside* one of them (between the result rename and the fence, between the reaper's rename
and its log record, between two renames of an intake batch), the driver wraps, in its own process
only, the function that performs the next step, and pauses before or after calling through.

Roles and their steps, in protocol order:

- ``agent --task ID``: ``claimed`` (claim renamed, no start record), ``started`` (start record
  logged, no output), ``streaming`` (some output in ``out~N.part``, more to come), ``result-staged``
  (result in its temporary file and flushed, not renamed), ``result-written``
  (``result~N.json`` in place, claim not yet renamed to ``done~N``), ``fenced`` (``done~N`` in
  place, end record not yet logged).
- ``reaper``: ``before-move`` (holder proven dead, claim not yet moved), ``moved`` (claim
  renamed, end record not yet logged), ``logged`` (end record logged, lease not yet removed).
- ``intake --nth K``: ``accepting`` (the K-th ``task.json`` renamed into place, its queue token
  not yet created; earlier tasks complete, later ones only staged), ``moving-sources`` (every
  task durable, the K-th source file about to leave ``tasks.d``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.backends.base import create_backend
from coordinator.config import Settings, load_settings
from coordinator.daemon.intake import Intake
from coordinator.models import AgentSpec
from coordinator.pipeline.context import TaskContext
from coordinator.pipeline.runner import Pipeline
from coordinator.pipeline.stages import StreamStage
from coordinator.spool import attempts as alog
from coordinator.spool import filespool
from coordinator.spool.filespool import FileSpool
from coordinator.spool.layout import SpoolLayout
from coordinator.spool.leases import AgentLease
from coordinator.spool.reaper import Reaper
from coordinator.store import Store

AGENT_STEPS = ("claimed", "started", "streaming", "result-staged", "result-written", "fenced")
REAPER_STEPS = ("before-move", "moved", "logged")
INTAKE_STEPS = ("accepting", "moving-sources")


class Checkpoints:
    """Prints the pause line and blocks at the one step the test asked for."""

    def __init__(self, stop_at: str) -> None:
        self.stop_at = stop_at
        self.facts: dict[str, Any] = {"pid": os.getpid()}

    def reached(self, step: str) -> None:
        if step != self.stop_at:
            return
        print(json.dumps({"paused": step, **self.facts}), flush=True)
        sys.stdin.readline()  # the test SIGKILLs us here; a line (or EOF) lets us go on

    def wrap(
        self,
        owner: Any,
        attr: str,
        step: str,
        *,
        after: bool = False,
        when: Callable[..., bool] = lambda *a, **k: True,
    ) -> None:
        """Pause at ``step`` just before (or after) ``owner.attr`` runs, if ``when`` says so."""
        original = getattr(owner, attr)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            hit = when(*args, **kwargs)
            if hit and not after:
                self.reached(step)
            value = original(*args, **kwargs)
            if hit and after:
                self.reached(step)
            return value

        setattr(owner, attr, wrapper)


def is_end_record(_path: Path, event: str, **_fields: Any) -> bool:
    return event == "end"


# ---------------------------------------------------------------------- agent


def run_agent(settings: Settings, task_id: str, cp: Checkpoints) -> None:
    layout = SpoolLayout(settings.spool_path).ensure()
    spool = FileSpool(layout)
    agent_id = f"driver.{secrets.token_hex(4)}"
    lease = AgentLease(layout, agent_id, {
        "spec": "driver", "stall_timeout": settings.stall_timeout, "supervisor": None,
    })
    cp.facts.update(agent_id=agent_id, task_id=task_id)
    loc = spool.locate(task_id)
    if loc.queue is None:
        raise SystemExit(f"task {task_id} is {loc.state}, not queued")
    claim = spool.claim(loc.queue, agent_id)
    if claim is None:
        raise SystemExit(f"lost the race for {task_id}")
    cp.facts["attempt"] = claim.attempt
    cp.reached("claimed")
    spool.start_attempt(claim, os.getpid())
    cp.reached("started")

    def output_on_disk(_stage: StreamStage, _text: str) -> bool:
        # The stream stage may buffer its first chunks; pause once output really is in the file.
        partial = layout.partial_path(task_id, claim.attempt)
        return partial.exists() and partial.stat().st_size > 0

    cp.wrap(StreamStage, "write", "streaming", after=True, when=output_on_disk)
    envelope = spool.read_envelope(task_id)
    # Words arrive slowly enough for some to reach out~N.part while others are still to come.
    options = {"token_delay_ms": 100}
    spec = AgentSpec(name="driver", backend="echo", backend_options=options)
    pipeline = Pipeline(create_backend("echo", options))
    started = time.time()
    ctx = TaskContext(task=envelope.task, attempt=claim.attempt, spec=spec,
                      emit=lambda _t: None, started_at=started)
    asyncio.run(pipeline.run(ctx, layout.partial_path(task_id, claim.attempt)))
    result = {
        "task_id": task_id, "attempt": claim.attempt, "agent": agent_id, "output": ctx.output,
        "usage": ctx.usage, "started_at": started, "ended_at": time.time(),
    }
    # complete_batch: write + syncfs, rename result~N.json, then the fence, then the end record.
    cp.wrap(filespool, "syncfs", "result-staged", after=True)
    cp.wrap(FileSpool, "_move_claim", "result-written")
    cp.wrap(alog, "log_event", "fenced", when=is_end_record)
    accepted = spool.complete_batch([(claim, result)])
    print(json.dumps({"finished": True, "accepted": accepted}), flush=True)
    lease.release()


# ---------------------------------------------------------------------- reaper


def run_reaper(settings: Settings, cp: Checkpoints) -> None:
    spool = FileSpool(SpoolLayout(settings.spool_path).ensure())
    reaper = Reaper(spool, stall_timeout=settings.stall_timeout, kill_grace=settings.kill_grace)
    cp.wrap(FileSpool, "_move_claim", "before-move")
    cp.wrap(alog, "log_event", "moved", when=is_end_record)
    cp.wrap(alog, "log_event", "logged", after=True, when=is_end_record)
    report = reaper.reap()
    print(json.dumps({"finished": True, "reclaimed": report.reclaimed}), flush=True)


# ---------------------------------------------------------------------- intake


def run_intake(settings: Settings, nth: int, cp: Checkpoints) -> None:
    spool = FileSpool(SpoolLayout(settings.spool_path).ensure())
    tasks_dir = settings.tasks_path
    counts = {"task.json": 0, "source": 0}

    def kth_envelope(_src: Any, dst: Any, **_kw: Any) -> bool:
        if Path(dst).name != "task.json":
            return False
        counts["task.json"] += 1
        return counts["task.json"] == nth

    def kth_source(src: Any, _dst: Any, **_kw: Any) -> bool:
        if Path(src).parent != tasks_dir:
            return False
        counts["source"] += 1
        return counts["source"] == nth

    # os.rename is looked up at each call, so the wrappers see FileSpool's and Intake's renames.
    cp.wrap(os, "rename", "accepting", after=True, when=kth_envelope)
    cp.wrap(os, "rename", "moving-sources", when=kth_source)
    store = Store(settings.db_file)
    intake = Intake(settings, spool, store)
    intake.start()
    handled = 0
    deadline = time.monotonic() + 60
    try:
        # As the daemon's intake loop does: files dropped just now are taken on a second look.
        while intake.pending and time.monotonic() < deadline:
            handled += intake.process()
            if intake.pending:
                time.sleep(0.1)
    finally:
        intake.close()
        store.close()
    print(json.dumps({"finished": True, "handled": handled}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--home", type=Path, required=True)
    sub = parser.add_subparsers(dest="role", required=True)
    agent = sub.add_parser("agent")
    agent.add_argument("--task", required=True)
    agent.add_argument("--stop-at", required=True, choices=AGENT_STEPS)
    reaper = sub.add_parser("reaper")
    reaper.add_argument("--stop-at", required=True, choices=REAPER_STEPS)
    intake = sub.add_parser("intake")
    intake.add_argument("--stop-at", required=True, choices=INTAKE_STEPS)
    intake.add_argument("--nth", type=int, default=1)
    args = parser.parse_args()
    settings = load_settings(args.home, environ={})
    cp = Checkpoints(args.stop_at)
    if args.role == "agent":
        run_agent(settings, args.task, cp)
    elif args.role == "reaper":
        run_reaper(settings, cp)
    else:
        run_intake(settings, args.nth, cp)


if __name__ == "__main__":
    main()
