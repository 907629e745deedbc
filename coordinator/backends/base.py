"""The ``ModelBackend`` interface, its request and chunk records, and the backend registry.

Backends register under the ``coordinator.backends`` entry-point group, built-in ones exactly as a
third-party package would (see pyproject.toml). A spec's ``backend_options`` are validated by the
backend's own pydantic options model when the spec is loaded, so a bad spec fails start-up.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

from coordinator.errors import ConfigError, describe_validation

ENTRY_POINT_GROUP = "coordinator.backends"


@dataclass(frozen=True, slots=True)
class ChildProcess:
    """A process group a backend started, so the agent's reaper can kill it if the agent dies."""

    pgid: int
    start_time: float | None


@dataclass
class InferenceRequest:
    """What the infer stage asks of a backend."""

    task_id: str
    attempt: int
    prompt: str
    system: str | None = None
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # Called with a child process group when one starts and with None-start when it ends.
    on_child: Callable[[ChildProcess, bool], None] | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of streamed output; the last chunk of a stream may carry usage only."""

    text: str = ""
    usage: dict[str, int] | None = None


class ModelBackend(abc.ABC):
    """Streams a completion for one request. One instance per agent process, shared by tasks."""

    name: ClassVar[str]
    options_model: ClassVar[type[BaseModel]]

    @abc.abstractmethod
    def stream(self, request: InferenceRequest) -> AsyncIterator[Chunk]:
        """Yield chunks as they arrive. Raises ``BackendError`` subclasses on failure."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release pooled connections and children."""


BackendFactory = Callable[[BaseModel], ModelBackend]


def _load(name: str) -> type[ModelBackend]:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, ModelBackend)):
                raise ConfigError(f"entry point {ep.value} for backend {name!r} is not a backend")
            return cls
    known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    raise ConfigError(
        f"unknown backend {name!r}; installed backends: {', '.join(known) or '(none)'}. "
        "Is fleet-coordinator installed (pip install -e .)?"
    )


def validate_options(name: str, options: dict[str, Any]) -> BaseModel:
    """Validate a spec's ``backend_options`` for backend ``name``; raises ``ConfigError``."""
    cls = _load(name)
    try:
        return cls.options_model.model_validate(options)
    except ValidationError as exc:
        problems = describe_validation(exc)
        raise ConfigError(f"invalid backend_options for {name}: {problems}") from exc


def create_backend(name: str, options: dict[str, Any]) -> ModelBackend:
    """Build the backend ``name`` from a spec's ``backend_options``."""
    cls = _load(name)
    return cls(validate_options(name, options))  # type: ignore[call-arg]
