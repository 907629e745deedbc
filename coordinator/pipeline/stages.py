"""The five stages. Each is a small class with one ``run`` method over a :class:`TaskContext`.

retrieve -> assemble -> infer -> post-process -> stream. The stream stage is the sink the infer
stage writes into as chunks arrive (so output is visible while the model is still talking); it
also closes the attempt's partial output once the answer is final. Committing the result is the
agent's job, because only the agent holds the claim that fences it.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path

from coordinator.backends.base import InferenceRequest, ModelBackend
from coordinator.pipeline.context import TaskContext


class Stage(abc.ABC):
    name: str

    @abc.abstractmethod
    async def run(self, ctx: TaskContext) -> None:
        """Advance ``ctx``; raise to fail the attempt."""


class RetrieveStage(Stage):
    """Find passages for the prompt. No sources configured: nothing to add."""

    name = "retrieve"

    async def run(self, ctx: TaskContext) -> None:
        ctx.passages = []


class AssembleStage(Stage):
    """Build the system prompt and user prompt from the spec and the task."""

    name = "assemble"

    async def run(self, ctx: TaskContext) -> None:
        ctx.system = ctx.spec.system_prompt
        ctx.prompt = ctx.task.prompt


class InferStage(Stage):
    """Stream the completion from the backend into the stream stage's sink."""

    name = "infer"

    def __init__(self, backend: ModelBackend) -> None:
        self.backend = backend

    async def run(self, ctx: TaskContext) -> None:
        task = ctx.task
        request = InferenceRequest(
            task_id=task.id,
            attempt=ctx.attempt,
            prompt=ctx.prompt,
            system=ctx.system,
            model=task.model,
            temperature=task.temperature,
            max_tokens=task.max_tokens,
            options=dict(task.options),
            on_child=ctx.on_child,
        )
        parts: list[str] = []
        async for chunk in self.backend.stream(request):
            if chunk.text:
                parts.append(chunk.text)
                ctx.emit(chunk.text)
            if chunk.usage:
                ctx.usage.update(chunk.usage)
        ctx.raw_output = "".join(parts)


class PostProcessStage(Stage):
    """Trim surrounding white space off the final answer."""

    name = "post-process"

    async def run(self, ctx: TaskContext) -> None:
        ctx.output = ctx.raw_output.strip()


class StreamStage(Stage):
    """Append output to the attempt's partial file as it arrives; close it at the end."""

    name = "stream"

    def __init__(self, partial: Path) -> None:
        self._fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)

    def write(self, text: str) -> None:
        if self._fd >= 0:
            os.write(self._fd, text.encode("utf-8"))

    async def run(self, ctx: TaskContext) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
