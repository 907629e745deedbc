"""What flows through the pipeline for one attempt of one task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator.backends.base import ChildProcess
from coordinator.models import AgentSpec, Task


@dataclass
class TaskContext:
    """One attempt's working state; each stage reads what earlier stages left and adds its own."""

    task: Task
    attempt: int
    spec: AgentSpec
    emit: Callable[[str], None]  # the stream stage's sink for output as it arrives
    on_child: Callable[[ChildProcess, bool], None] | None = None
    passages: list[dict[str, Any]] = field(default_factory=list)  # retrieve
    system: str | None = None  # assemble
    prompt: str = ""  # assemble
    raw_output: str = ""  # infer
    usage: dict[str, int] = field(default_factory=dict)  # infer
    output: str = ""  # post-process
    started_at: float = 0.0
