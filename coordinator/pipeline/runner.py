"""Run one attempt through the five stages."""

from __future__ import annotations

import time
from pathlib import Path

from coordinator.backends.base import ModelBackend
from coordinator.pipeline.context import TaskContext
from coordinator.pipeline.stages import (
    AssembleStage,
    InferStage,
    PostProcessStage,
    RetrieveStage,
    StreamStage,
)


class Pipeline:
    """The stage chain of one agent process. Stateless between tasks except the backend."""

    def __init__(self, backend: ModelBackend) -> None:
        self.retrieve = RetrieveStage()
        self.assemble = AssembleStage()
        self.infer = InferStage(backend)
        self.post = PostProcessStage()

    async def run(self, ctx: TaskContext, partial: Path) -> None:
        """Drive ``ctx`` through every stage; output streams into ``partial`` as it arrives."""
        ctx.started_at = ctx.started_at or time.time()
        stream = StreamStage(partial)
        ctx.emit = stream.write
        try:
            await self.retrieve.run(ctx)
            await self.assemble.run(ctx)
            await self.infer.run(ctx)
            await self.post.run(ctx)
            await stream.run(ctx)
        finally:
            stream.close()
