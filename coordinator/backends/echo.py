"""``echo``: a keyless backend that streams the prompt back word by word, for demos and tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

from coordinator.backends.base import Chunk, InferenceRequest, ModelBackend


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token_delay_ms: float = Field(default=20.0, ge=0)  # delay before each streamed word
    prefix: str = ""  # prepended to the echoed prompt


class EchoBackend(ModelBackend):
    """Streams ``prefix + prompt`` back one word at a time; usage counts words as tokens."""

    name = "echo"
    options_model = EchoOptions

    def __init__(self, options: BaseModel) -> None:
        assert isinstance(options, EchoOptions)
        self.options = options

    async def stream(self, request: InferenceRequest) -> AsyncIterator[Chunk]:
        text = self.options.prefix + request.prompt
        words = text.split(" ")
        delay = self.options.token_delay_ms / 1000.0
        for index, word in enumerate(words):
            if delay:
                await asyncio.sleep(delay)
            yield Chunk(text=word if index == 0 else " " + word)
        prompt_tokens = len(request.prompt.split()) + len((request.system or "").split())
        yield Chunk(
            usage={"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split())}
        )
