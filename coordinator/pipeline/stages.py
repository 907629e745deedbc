"""The five stages. Each is a small class with one ``run`` method over a :class:`TaskContext`.

retrieve -> assemble -> infer -> post-process -> stream. The stream stage is the sink the infer
stage writes into as chunks arrive (so output is visible while the model is still talking); it
also closes the attempt's partial output once the answer is final. Committing the result is the
agent's job, because only the agent holds the claim that fences it.
"""

from __future__ import annotations

import abc
import asyncio
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
    """Append output to the attempt's partial file as it arrives; close it at the end.

    Output is written at most ``flush_interval`` after it arrived (a timer flushes it even when
    the model goes quiet), so ``show --follow`` sees it live. An attempt that finishes within
    the first interval never creates the partial file at all: its output goes straight into
    the committed result, which saves a file creation per task on the hot path.
    """

    name = "stream"

    def __init__(self, partial: Path, flush_interval: float = 0.05) -> None:
        self._path = partial
        self._fd = -1
        self._buffer: list[str] = []
        self._interval = flush_interval
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def write(self, text: str) -> None:
        if self._closed:
            return
        self._buffer.append(text)
        if self._fd >= 0:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._flush)

    def _flush(self) -> None:
        if self._closed:
            return
        if self._fd < 0:
            self._fd = os.open(
                self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644
            )
        if self._buffer:
            os.write(self._fd, "".join(self._buffer).encode("utf-8"))
            self._buffer.clear()

    async def run(self, ctx: TaskContext) -> None:
        if self._fd >= 0:
            self._flush()  # the tail, so a follower sees everything before the commit
        self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
