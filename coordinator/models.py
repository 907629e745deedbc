"""Records shared by every layer: tasks, agent specs, attempts (pydantic, no I/O)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from coordinator.states import AttemptOutcome, TaskState

# Ids and spec names become file names in the spool, so they are restricted to a safe alphabet,
# must start with a letter or digit (no ".", "..", dotfiles or "-option" look-alikes) and never
# contain a path separator or the "~" the spool uses to separate fields in a token name.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
NAME_RE = re.compile(NAME_PATTERN)
TaskId = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
SpecName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]

MAX_PRIORITY = 999_999_999
DEFAULT_PRIORITY = 100


def is_valid_name(value: str) -> bool:
    """True if ``value`` can be a task id or agent spec name."""
    return bool(NAME_RE.match(value))


class Task(BaseModel):
    """One unit of LLM work as the user wrote it. Unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: TaskId
    prompt: Annotated[str, StringConstraints(min_length=1)]
    priority: int = Field(default=DEFAULT_PRIORITY, ge=0, le=MAX_PRIORITY)
    agent: SpecName | None = None  # which spec may take it; None: any
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    session: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)  # passed to the backend as they are

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty or only white space")
        if "\x00" in value:
            raise ValueError("prompt contains a NUL character")
        return value


class TaskEnvelope(BaseModel):
    """What the spool stores for an accepted task: the task plus how and when it arrived."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Task
    seq: int  # arrival order; ties of priority are broken by it
    accepted_at: float
    source: str  # the file name it came from
    source_sha256: str
    max_attempts: int  # the task's own, or the configured default at acceptance
    source_inode: int | None = None


class AgentSpec(BaseModel):
    """``agents/<name>.toml``: how to run one kind of agent. Data, not code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: SpecName
    backend: str
    description: str = ""
    processes: int = Field(default=1, ge=0, le=256)
    concurrency: int = Field(default=1, ge=1, le=1024)
    system_prompt: str | None = None
    stall_timeout: float | None = Field(default=None, gt=0)
    backend_options: dict[str, Any] = Field(default_factory=dict)


class AttemptRecord(BaseModel):
    """One attempt of one task as recorded in the spool's attempt log."""

    model_config = ConfigDict(extra="ignore")

    number: int
    agent: str
    pid: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    outcome: AttemptOutcome = AttemptOutcome.RUNNING
    reason: str | None = None


class TaskView(BaseModel):
    """Everything ``coordinator show`` reports about a task (its ``--json`` schema)."""

    id: str
    state: TaskState
    priority: int | None = None
    agent: str | None = None
    source: str | None = None
    accepted_at: float | None = None
    attempts: list[AttemptRecord] = Field(default_factory=list)
    output: str | None = None
    usage: dict[str, int] | None = None
    reason: str | None = None
    claimed_by: str | None = None
