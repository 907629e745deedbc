"""Find claims held by dead or stalled agents and end their attempts.

Any number of reapers may run at once (the daemon, standalone agents): every change is a rename
that only one of them can win. A dead agent's claims are ended as CRASHED; an agent that is alive
but silent past its stall timeout is stopped first (its whole process group and its children's
groups) and only once it is provably dead are its claims ended as STALLED. A slow attempt whose
agent keeps heartbeating is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from coordinator.proc import kill_group, kill_process
from coordinator.spool.filespool import FileSpool
from coordinator.spool.layout import ClaimName
from coordinator.spool.leases import AgentProbe, list_agent_ids, probe_agent, read_children
from coordinator.states import AttemptOutcome, TaskState

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    """What one pass did."""

    reclaimed: list[tuple[str, int, TaskState]] = field(default_factory=list)
    stopped_agents: list[str] = field(default_factory=list)
    removed_leases: list[str] = field(default_factory=list)


class Reaper:
    """One reclaim pass over the spool; call :meth:`reap` periodically."""

    def __init__(self, spool: FileSpool, *, stall_timeout: float, kill_grace: float) -> None:
        self.spool = spool
        self.stall_timeout = stall_timeout
        self.kill_grace = kill_grace

    def _stall_limit(self, probe: AgentProbe) -> float:
        value = probe.info.get("stall_timeout")
        return float(value) if isinstance(value, int | float) else self.stall_timeout

    def stop_agent(self, probe: AgentProbe) -> bool:
        """Stop a live agent and its children; True once it is provably dead."""
        pid = probe.pid
        if pid is None:
            return False
        start = probe.info.get("create_time")
        if probe.info.get("pgid") == pid:
            done = kill_group(pid, self.kill_grace, leader_start=start)
        else:
            done = kill_process(pid, self.kill_grace, start)
        self.kill_children(probe.agent_id)
        return done and not probe_agent(self.spool.layout, probe.agent_id).alive

    def kill_children(self, agent_id: str) -> None:
        for pgid, start in read_children(self.spool.layout, agent_id).items():
            kill_group(pgid, self.kill_grace, leader_start=start)

    def reap(self, now: float | None = None) -> ReapReport:
        layout = self.spool.layout
        now = time.time() if now is None else now
        report = ReapReport()
        by_agent: dict[str, list[ClaimName]] = defaultdict(list)
        for claim in layout.list_claims():
            by_agent[claim.agent_id].append(claim)
        for agent_id in set(by_agent) | set(list_agent_ids(layout)):
            probe = probe_agent(layout, agent_id, now)
            outcome = AttemptOutcome.CRASHED
            if probe.alive:
                age = probe.heartbeat_age or 0.0
                if age <= self._stall_limit(probe):
                    continue
                log.warning(
                    "agent %s (pid %s) silent for %.1fs: stopping it",
                    agent_id,
                    probe.pid,
                    age,
                    extra={"agent": agent_id},
                )
                if not self.stop_agent(probe):
                    log.warning("agent %s did not die yet; will retry", agent_id)
                    continue
                report.stopped_agents.append(agent_id)
                outcome = AttemptOutcome.STALLED
            else:
                self.kill_children(agent_id)
            # The agent is provably dead: no attempt of it can still be running.
            for claim in by_agent.get(agent_id, []):
                reason = (
                    f"agent {agent_id} stopped heartbeating"
                    if outcome is AttemptOutcome.STALLED
                    else f"agent {agent_id} (pid {probe.pid}) died holding the claim"
                )
                state = self.spool.end_attempt(claim, outcome, reason, by="reaper")
                if state is not None:
                    log.warning(
                        "task %s attempt %d reclaimed from %s -> %s",
                        claim.task_id,
                        claim.attempt,
                        agent_id,
                        state.value,
                        extra={"task_id": claim.task_id, "attempt": claim.attempt},
                    )
                    report.reclaimed.append((claim.task_id, claim.attempt, state))
            if not any(c.agent_id == agent_id for c in layout.list_claims()):
                for path in (layout.lease_path(agent_id), layout.children_path(agent_id)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                report.removed_leases.append(agent_id)
        return report
