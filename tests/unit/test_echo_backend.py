"""The echo backend: streams prefix + prompt word by word and reports word counts as usage."""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.backends.base import Chunk, InferenceRequest, create_backend
from coordinator.backends.echo import EchoBackend
from coordinator.errors import ConfigError


def collect(options: dict[str, object], request: InferenceRequest) -> list[Chunk]:
    backend = create_backend("echo", options)

    async def run() -> list[Chunk]:
        chunks = [chunk async for chunk in backend.stream(request)]
        await backend.aclose()
        return chunks

    return asyncio.run(run())


def test_registry_builds_the_echo_backend() -> None:
    backend = create_backend("echo", {})
    assert isinstance(backend, EchoBackend)
    assert backend.name == "echo"


def test_streams_words_in_order_with_the_prefix() -> None:
    chunks = collect({"token_delay_ms": 0, "prefix": "echo: "},
                     InferenceRequest("t1", 1, "hello brave new world"))
    texts = [c.text for c in chunks if c.text]
    assert texts == ["echo:", " hello", " brave", " new", " world"]
    assert "".join(texts) == "echo: hello brave new world"
    assert all(c.usage is None for c in chunks[:-1])


def test_output_reproduces_odd_white_space_exactly() -> None:
    prompt = "  two  spaces\nand a\tnewline "
    chunks = collect({"token_delay_ms": 0}, InferenceRequest("t1", 1, prompt))
    assert "".join(c.text for c in chunks) == prompt
    assert len([c for c in chunks if c.text]) > 1  # streamed, not one blob


def test_last_chunk_carries_usage_counts() -> None:
    chunks = collect({"token_delay_ms": 0, "prefix": "a b "},
                     InferenceRequest("t1", 1, "one two three", system="sys tem words"))
    last = chunks[-1]
    assert last.text == ""
    assert last.usage == {"prompt_tokens": 3 + 3, "completion_tokens": 2 + 3}


def test_usage_without_system_prompt_or_prefix() -> None:
    chunks = collect({"token_delay_ms": 0}, InferenceRequest("t1", 1, "x y"))
    assert chunks[-1].usage == {"prompt_tokens": 2, "completion_tokens": 2}


def test_token_delay_paces_the_stream() -> None:
    started = time.monotonic()
    chunks = collect({"token_delay_ms": 20}, InferenceRequest("t1", 1, "a b c d e"))
    assert "".join(c.text for c in chunks) == "a b c d e"
    assert time.monotonic() - started >= 5 * 0.02 * 0.9  # at least one delay per word


@pytest.mark.parametrize("options", [{"token_delay_ms": -1}, {"prefixx": "x"}])
def test_bad_options_are_config_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="echo"):
        create_backend("echo", options)
