"""One agent process: hold a lease, claim the most urgent task it can serve, run the pipeline,
commit the result through the fence; on SIGTERM finish or give back what it holds.

Guarantees: the lease exists (locked) before the first claim, so a crash at any instant leaves
claims the reaper can prove orphaned; results are committed only through
``FileSpool.complete_batch`` (group commit, fenced); a task whose claim disappears (cancelled or
reclaimed) is stopped at the next heartbeat, its child processes killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Any

from coordinator.agent.index import QueueIndex
from coordinator.agent.recorder import Recorder
from coordinator.backends.base import ChildProcess, create_backend
from coordinator.config import Settings
from coordinator.errors import BackendError, CoordinatorError
from coordinator.models import AgentSpec, AttemptRecord
from coordinator.pipeline.context import TaskContext
from coordinator.pipeline.runner import Pipeline
from coordinator.spool.filespool import FileSpool
from coordinator.spool.layout import ClaimName, SpoolLayout
from coordinator.spool.leases import AgentLease
from coordinator.spool.reaper import Reaper
from coordinator.states import AttemptOutcome, TaskState

log = logging.getLogger(__name__)


def new_agent_id(spec_name: str) -> str:
    return f"{spec_name}.{secrets.token_hex(4)}"


@dataclass
class _Running:
    claim: ClaimName
    task: asyncio.Task[None]
    started_at: float


class Agent:
    """The agent loop. ``supervisor_pid`` is the daemon that started it, if any."""

    def __init__(
        self,
        settings: Settings,
        spec: AgentSpec,
        *,
        agent_id: str | None = None,
        supervisor_pid: int | None = None,
        reap: bool | None = None,
        exit_when_idle: bool = False,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.agent_id = agent_id or new_agent_id(spec.name)
        self.supervisor_pid = supervisor_pid
        self.reap = supervisor_pid is None if reap is None else reap
        self.exit_when_idle = exit_when_idle
        self.layout = SpoolLayout(settings.spool_path).ensure()
        self.spool = FileSpool(self.layout)
        self.running: dict[str, _Running] = {}
        self.children: dict[int, float | None] = {}
        self.stopping = asyncio.Event()
        self._done: list[tuple[ClaimName, dict[str, Any], TaskContext]] = []
        self._commit_wakeup = asyncio.Event()
        self._closing = False
        self.lease: AgentLease | None = None
        self.recorder = Recorder(settings.db_file)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)  # handlers only set a flag
        stall = self.spec.stall_timeout or self.settings.stall_timeout
        self.lease = AgentLease(
            self.layout,
            self.agent_id,
            {"spec": self.spec.name, "stall_timeout": stall, "supervisor": self.supervisor_pid},
        )
        self.recorder.agent(self.agent_id, self.spec.name, os.getpid(), "running")
        backend = create_backend(self.spec.backend, self.spec.backend_options)
        self.pipeline = Pipeline(backend)
        index = QueueIndex(self.layout, self.spec.name)
        index.start()
        log.info(
            "agent %s (spec %s, pid %d) started, concurrency %d",
            self.agent_id,
            self.spec.name,
            os.getpid(),
            self.spec.concurrency,
            extra={"agent": self.agent_id},
        )
        committer = asyncio.create_task(self._commit_loop())
        helpers = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self.recorder.flush_loop()),
        ]
        if self.reap:
            helpers.append(asyncio.create_task(self._reap_loop()))
        try:
            await self._claim_loop(index)
            await self._shutdown()
        finally:
            index.close()
            for helper in helpers:
                helper.cancel()
            for helper in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
            # The committer is never cancelled: a batch in flight runs in a thread that a
            # cancellation could not stop, so we let it finish and drain what is left.
            self._closing = True
            self._commit_wakeup.set()
            await committer
            await backend.aclose()
            self.recorder.agent(self.agent_id, self.spec.name, os.getpid(), "stopped")
            self.recorder.flush()
            self.recorder.close()
            self.lease.release()
            log.info("agent %s stopped", self.agent_id, extra={"agent": self.agent_id})
        return 0

    async def _claim_loop(self, index: QueueIndex) -> None:
        capacity = asyncio.Semaphore(self.spec.concurrency)
        while not self.stopping.is_set():
            if not await self._acquire_slot(capacity):
                break
            claim = self._claim_next(index)
            if claim is None:
                capacity.release()
                if self.exit_when_idle and not self.running and not self._done:
                    index.refresh()
                    if not len(index):
                        self.stopping.set()
                        break
                await self._wait_for_work(index)
                continue
            runner = asyncio.create_task(self._run_attempt(claim))
            self.running[claim.task_id] = _Running(claim, runner, time.time())
            runner.add_done_callback(lambda _t: capacity.release())

    async def _acquire_slot(self, capacity: asyncio.Semaphore) -> bool:
        """Wait for a free slot; False (holding none) as soon as a stop is requested.

        Waiting on the semaphore alone missed a stop while every slot was busy: the loop saw
        ``stopping`` only once some attempt ended, so an agent whose attempts never end (a hung
        CLI) ignored SIGTERM, and one whose daemon was killed ran on unsupervised for ever.
        """
        if not capacity.locked():
            # A free slot: take it without racing two tasks (this runs once per claim).
            await capacity.acquire()
            return True
        acquirer = asyncio.create_task(capacity.acquire())
        stopper = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({acquirer, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (acquirer, stopper):
            waiter.cancel()  # a slot granted just as it is cancelled goes back to the semaphore
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
        if acquirer.cancelled():
            return False
        if self.stopping.is_set():
            capacity.release()
            return False
        return True

    async def _wait_for_work(self, index: QueueIndex) -> None:
        waiter = asyncio.create_task(index.wait(self.settings.rescan_interval))
        stopper = asyncio.create_task(self.stopping.wait())
        done, pending = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if waiter in done and not len(index):
            index.refresh()  # idle safety net for events the kernel never delivered

    def _claim_next(self, index: QueueIndex) -> ClaimName | None:
        while (name := index.pop()) is not None:
            if name.task_id in self.running:
                continue  # a stale entry of a task we hold
            claim = self.spool.claim(name, self.agent_id)
            if claim is not None:
                return claim
        return None

    async def _shutdown(self) -> None:
        """Let in-flight attempts finish within the grace period, then give the rest back."""
        if not self.running:
            return
        log.info(
            "agent %s stopping: %d task(s) in flight, grace %.0fs",
            self.agent_id,
            len(self.running),
            self.settings.shutdown_grace,
        )
        pending = [r.task for r in self.running.values()]
        _, still = await asyncio.wait(pending, timeout=self.settings.shutdown_grace)
        for runner in still:
            runner.cancel()
        for runner in still:
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    # ------------------------------------------------------------------ one attempt

    def _on_child(self, child: ChildProcess, started: bool) -> None:
        if started:
            self.children[child.pgid] = child.start_time
        else:
            self.children.pop(child.pgid, None)
        if self.lease is not None:
            self.lease.record_children(self.children)

    async def _run_attempt(self, claim: ClaimName) -> None:
        tid, n = claim.task_id, claim.attempt
        extra = {"task_id": tid, "attempt": n, "agent": self.agent_id}
        started = time.time()
        try:
            self.spool.start_attempt(claim, os.getpid())
            envelope = self.spool.read_envelope(tid)
            task = envelope.task
            self.recorder.attempt(tid, AttemptRecord(
                number=n, agent=self.agent_id, pid=os.getpid(), started_at=started
            ), TaskState.CLAIMED)
            log.info("task %s attempt %d: queued -> claimed", tid, n, extra=extra)
            ctx = TaskContext(
                task=task, attempt=n, spec=self.spec, emit=lambda _t: None,
                on_child=self._on_child, started_at=started,
            )
            async with asyncio.timeout(task.timeout):
                await self.pipeline.run(ctx, self.layout.partial_path(tid, n))
        except asyncio.CancelledError:
            self.running.pop(tid, None)
            await self._end_cancelled(claim)
            raise
        except TimeoutError:
            self._end(claim, AttemptOutcome.TIMEOUT, f"task timeout of {task.timeout}s passed")
        except BackendError as exc:
            outcome = AttemptOutcome.FAILED
            self._end(claim, outcome, exc.message, final=not exc.retryable)
        except CoordinatorError as exc:
            self._end(claim, AttemptOutcome.FAILED, exc.message)
        except Exception as exc:
            log.exception("task %s attempt %d: unexpected error", tid, n, extra=extra)
            self._end(claim, AttemptOutcome.FAILED, f"{type(exc).__name__}: {exc}")
        else:
            result = {
                "task_id": tid,
                "attempt": n,
                "agent": self.agent_id,
                "output": ctx.output,
                "usage": ctx.usage,
                "started_at": started,
                "ended_at": time.time(),
            }
            self._done.append((claim, result, ctx))
            self._commit_wakeup.set()
            return
        self.running.pop(tid, None)

    async def _end_cancelled(self, claim: ClaimName) -> None:
        if self.spool.holds(claim):
            # Shutdown, not an operator cancel: give the task back for another agent.
            self._end(claim, AttemptOutcome.RELEASED, "agent shut down before finishing")
        else:
            log.info("task %s attempt %d: claim gone, work stopped", claim.task_id, claim.attempt,
                     extra={"task_id": claim.task_id, "attempt": claim.attempt})
            self._record_from_spool(claim)

    def _end(
        self,
        claim: ClaimName,
        outcome: AttemptOutcome,
        reason: str,
        *,
        final: bool = False,
    ) -> None:
        if final:
            outcome = AttemptOutcome.FAILED
        state = self.spool.end_attempt(claim, outcome, reason, by="agent", final=final)
        log.log(
            logging.WARNING if outcome is not AttemptOutcome.RELEASED else logging.INFO,
            "task %s attempt %d: %s (%s) -> %s",
            claim.task_id, claim.attempt, outcome.value, reason,
            state.value if state else "superseded",
            extra={"task_id": claim.task_id, "attempt": claim.attempt, "agent": self.agent_id},
        )
        self._record_from_spool(claim)

    def _record_from_spool(self, claim: ClaimName) -> None:
        with contextlib.suppress(CoordinatorError):
            loc = self.spool.locate(claim.task_id)
            records = self.spool.attempts_at(claim.task_id, loc)
            for record in records:
                if record.number == claim.attempt:
                    reason = record.reason if loc.state is TaskState.FAILED else None
                    self.recorder.attempt(claim.task_id, record, loc.state, reason)

    # ------------------------------------------------------------------ commit

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            await self._commit_pending()
            if self._closing and not self._done:
                return

    async def _commit_pending(self) -> None:
        """Commit every finished attempt in one group commit (results flushed once)."""
        while self._done:
            batch, self._done = self._done, []
            items = [(claim, result) for claim, result, _ in batch]
            accepted = await asyncio.to_thread(self.spool.complete_batch, items)
            for (claim, result, _ctx), ok in zip(batch, accepted, strict=True):
                self.running.pop(claim.task_id, None)
                extra = {"task_id": claim.task_id, "attempt": claim.attempt,
                         "agent": self.agent_id}
                if ok:  # the spool logged "claimed -> done" when it fenced the claim
                    self.recorder.attempt(claim.task_id, AttemptRecord(
                        number=claim.attempt, agent=self.agent_id, pid=os.getpid(),
                        started_at=result["started_at"], ended_at=result["ended_at"],
                        outcome=AttemptOutcome.DONE,
                    ), TaskState.DONE)
                else:
                    log.warning("task %s attempt %d: finished after losing its claim; result "
                                "discarded", claim.task_id, claim.attempt, extra=extra)
                    self._record_from_spool(claim)

    # ------------------------------------------------------------------ background

    async def _heartbeat_loop(self) -> None:
        assert self.lease is not None
        while True:
            self.lease.heartbeat()
            for entry in list(self.running.values()):
                if not entry.task.done() and not self.spool.holds(entry.claim):
                    entry.task.cancel()  # cancelled or reclaimed: stop the work now
            if (self.supervisor_pid is not None and os.getppid() != self.supervisor_pid
                    and not self.stopping.is_set()):
                log.warning("agent %s: its daemon is gone; shutting down", self.agent_id)
                self.stopping.set()
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _reap_loop(self) -> None:
        reaper = Reaper(
            self.spool,
            stall_timeout=self.settings.stall_timeout,
            kill_grace=self.settings.kill_grace,
        )
        while True:
            try:
                await asyncio.to_thread(reaper.reap)
            except Exception:
                log.exception("reap pass failed")
            await asyncio.sleep(self.settings.reap_interval)
