"""The command backend with real child processes: streaming, prompt passing, environment,
failures, and the process-group kill that leaves no orphans (timeout, cancel, normal exit)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from coordinator.backends.base import ChildProcess, Chunk, InferenceRequest, create_backend
from coordinator.backends.command import CommandBackend, _Utf8Stream
from coordinator.errors import BackendError, BackendTimeout, BackendUnavailable
from tests.support import gone, group_members, wait_until

PY = sys.executable

# A child that starts a grandchild `sleep 300` in its own process group, reports both pids on
# stdout, then blocks. GRANDCHILD_STDOUT is "devnull" or "inherit" (the grandchild keeps the
# pipe open, as helper daemons of real agent CLIs do).
SPAWNER = """
import os, subprocess, sys, time
mode = sys.argv[1]
out = subprocess.DEVNULL if mode == "devnull" else None
g = subprocess.Popen(["sleep", "300"], stdout=out, stdin=subprocess.DEVNULL)
print("PIDS", os.getpid(), os.getpgid(0), g.pid, os.getpgid(g.pid), flush=True)
if sys.argv[2] == "block":
    time.sleep(300)
"""


def make(argv: list[str], **options: Any) -> CommandBackend:
    backend = create_backend("command", {"argv": argv, "kill_grace": 0.5, **options})
    assert isinstance(backend, CommandBackend)
    return backend


def request(prompt: str = "hello", **kwargs: Any) -> InferenceRequest:
    return InferenceRequest(task_id=kwargs.pop("task_id", "task-1"),
                            attempt=kwargs.pop("attempt", 1), prompt=prompt, **kwargs)


def run(backend: CommandBackend, req: InferenceRequest) -> tuple[list[Chunk], BaseException | None]:
    """Consume the whole stream; return the chunks and the exception it ended with, if any."""
    chunks: list[Chunk] = []

    async def consume() -> BaseException | None:
        try:
            async for chunk in backend.stream(req):
                chunks.append(chunk)
        except BackendError as exc:
            return exc
        finally:
            await backend.aclose()
        return None

    error = asyncio.run(consume())
    return chunks, error


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)




def parse_pids(text: str) -> tuple[int, int, int, int]:
    line = next(line for line in text.splitlines() if line.startswith("PIDS "))
    child, child_pgid, grandchild, grandchild_pgid = (int(x) for x in line.split()[1:])
    return child, child_pgid, grandchild, grandchild_pgid


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids a test started indirectly; killed at teardown so a failing test leaves nothing."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def assert_group_gone(child: int, grandchild: int, timeout: float = 5.0) -> None:
    # The backend waits for the group before it returns, so this should already hold; the
    # deadline only absorbs the kernel finishing the exit of a SIGKILLed process.
    wait_until(lambda: gone(child) and gone(grandchild) and not group_members(child),
               timeout, "child and grandchild gone")


# ---------------------------------------------------------------- streaming and prompt passing


def test_stdout_is_streamed_as_chunks_in_order() -> None:
    script = (
        "import sys, time\n"
        "for i in range(5):\n"
        "    sys.stdout.write(f'part{i};'); sys.stdout.flush(); time.sleep(0.05)\n"
    )
    chunks, error = run(make([PY, "-c", script]), request())
    assert error is None
    assert text_of(chunks) == "part0;part1;part2;part3;part4;"
    assert len(chunks) > 1  # streamed as it came, not collected until exit
    assert [c.text for c in chunks if c.text] == [c.text for c in chunks]  # no empty chunks


def test_output_arrives_while_the_child_still_runs() -> None:
    script = "import sys, time\nsys.stdout.write('early\\n'); sys.stdout.flush()\ntime.sleep(3)\n"
    backend = make([PY, "-c", script])

    async def first_line() -> float:
        started = time.monotonic()
        text = ""
        stream = backend.stream(request())
        async for chunk in stream:
            text += chunk.text
            if text.endswith("\n"):
                break
        elapsed = time.monotonic() - started
        await stream.aclose()  # type: ignore[attr-defined]  # kills the child
        assert text == "early\n"
        return elapsed

    assert asyncio.run(first_line()) < 2.5


def test_timeout_while_the_consumer_is_busy_is_still_a_backend_timeout() -> None:
    # The consumer awaits between chunks (a slow writer downstream); the deadline passes while
    # the stream is suspended at a yield. It must surface as BackendTimeout, not a stray cancel.
    script = "import sys, time\nfor i in range(100):\n    print(i, flush=True); time.sleep(0.05)\n"
    backend = make([PY, "-c", script], timeout=0.5)

    async def slow_consumer() -> BaseException | None:
        try:
            async for _chunk in backend.stream(request()):
                await asyncio.sleep(0.3)
        except BackendError as exc:
            return exc
        return None

    assert isinstance(asyncio.run(slow_consumer()), BackendTimeout)


def test_prompt_goes_to_stdin_when_argv_has_no_placeholder() -> None:
    script = (
        "import sys\ndata = sys.stdin.read()\n"
        "sys.stdout.write('got:' + data + ':' + sys.argv[1])"
    )
    prompt = "line one\nline two ünïcode"
    chunks, error = run(make([PY, "-c", script, "fixed-arg"]), request(prompt))
    assert error is None
    assert text_of(chunks) == f"got:{prompt}:fixed-arg"


def test_prompt_is_substituted_into_argv_and_stdin_is_empty() -> None:
    script = "import sys\nsys.stdout.write(repr(sys.argv[1:]) + repr(sys.stdin.read()))"
    argv = [PY, "-c", script, "--print", "{prompt}", "--message={prompt}!"]
    chunks, error = run(make(argv), request("two words"))
    assert error is None
    assert text_of(chunks) == repr(["--print", "two words", "--message=two words!"]) + repr("")


def test_prompt_never_passes_through_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    prompt = f"$(touch {marker}); `touch {marker}` && touch {marker} | rm -rf; echo $HOME *"
    script = "import sys\nsys.stdout.write(sys.argv[1])"
    chunks, error = run(make([PY, "-c", script, "{prompt}"]), request(prompt))
    assert error is None
    assert text_of(chunks) == prompt  # arrived literally, as one argument
    assert not marker.exists()
    # The same through stdin.
    chunks, error = run(make([PY, "-c", "import sys\nsys.stdout.write(sys.stdin.read())"]),
                        request(prompt))
    assert error is None
    assert text_of(chunks) == prompt
    assert not marker.exists()


def test_child_environment_carries_task_id_attempt_and_spec_env() -> None:
    script = (
        "import os\n"
        "print(os.environ['COORDINATOR_TASK_ID'], os.environ['COORDINATOR_ATTEMPT'],"
        " os.environ['EXTRA'], os.environ.get('PATH') is not None)"
    )
    backend = make([PY, "-c", script], env={"EXTRA": "from-spec"})
    chunks, error = run(backend, request(task_id="job-42", attempt=3))
    assert error is None
    assert text_of(chunks) == "job-42 3 from-spec True\n"


def test_task_identity_cannot_be_overridden_by_spec_env() -> None:
    script = "import os\nprint(os.environ['COORDINATOR_TASK_ID'])"
    backend = make([PY, "-c", script], env={"COORDINATOR_TASK_ID": "spoofed"})
    chunks, _ = run(backend, request(task_id="real"))
    assert text_of(chunks) == "real\n"


def test_cwd_option(tmp_path: Path) -> None:
    chunks, error = run(make([PY, "-c", "import os\nprint(os.getcwd())"], cwd=str(tmp_path)),
                        request())
    assert error is None
    assert text_of(chunks).strip() == str(tmp_path)


def test_multibyte_utf8_split_across_reads_decodes_correctly() -> None:
    # 4096-byte reads: "a" + two-byte characters puts a boundary inside a character, and the
    # mixed three- and four-byte characters are split at every other offset too.
    expected = "a" + "é" * 3000 + "€😀" * 2000 + "z"
    script = (
        "import sys\n"
        f"data = {expected!r}.encode('utf-8')\n"
        "for i in range(0, len(data), 1001):\n"
        "    sys.stdout.buffer.write(data[i:i + 1001]); sys.stdout.buffer.flush()\n"
    )
    chunks, error = run(make([PY, "-c", script]), request())
    assert error is None
    assert "\ufffd" not in text_of(chunks)
    assert text_of(chunks) == expected


def test_utf8_decoder_byte_by_byte() -> None:
    text = "añ€😀z"
    decoder = _Utf8Stream()
    out = "".join(decoder.feed(bytes([b])) for b in text.encode("utf-8"))
    assert out + decoder.feed(b"", final=True) == text


def test_truncated_utf8_at_end_of_output_is_replaced_not_fatal() -> None:
    script = "import sys\nsys.stdout.buffer.write('ok €'.encode()[:-1])"
    chunks, error = run(make([PY, "-c", script]), request())
    assert error is None
    assert text_of(chunks) == "ok \ufffd"


def test_large_prompt_on_stdin_while_child_writes_large_output() -> None:
    # The child writes 1 MiB before it reads its 1 MiB prompt: feeding stdin must not wait for
    # the child to read while nobody drains its stdout (a pipe deadlock).
    script = (
        "import sys\n"
        "sys.stdout.write('x' * (1 << 20)); sys.stdout.flush()\n"
        "data = sys.stdin.read()\n"
        "sys.stdout.write(f'|{len(data)}')\n"
    )
    prompt = "p" * (1 << 20)
    chunks, error = run(make([PY, "-c", script], timeout=30), request(prompt))
    assert error is None
    text = text_of(chunks)
    assert text == "x" * (1 << 20) + f"|{1 << 20}"


def test_child_that_ignores_stdin_does_not_block_the_stream() -> None:
    prompt = "p" * (1 << 20)  # far more than a pipe holds
    chunks, error = run(make([PY, "-c", "print('done')"]), request(prompt))
    assert error is None
    assert text_of(chunks) == "done\n"


# ---------------------------------------------------------------- failures


def test_nonzero_exit_raises_backend_error_with_stderr_tail() -> None:
    script = (
        "import sys\n"
        "sys.stdout.write('partial output')\n"
        "sys.stderr.write('noise ' * 2000 + 'THE REAL CAUSE')\n"
        "sys.exit(3)\n"
    )
    chunks, error = run(make([PY, "-c", script]), request())
    assert text_of(chunks) == "partial output"  # what streamed before the failure
    assert type(error) is BackendError
    assert error.retryable
    assert "exited with status 3" in error.message
    assert error.message.endswith("THE REAL CAUSE")
    assert len(error.message) < 2500  # the tail, not all 12 kB


def test_nonzero_exit_without_stderr_says_so() -> None:
    _, error = run(make([PY, "-c", "raise SystemExit(7)"]), request())
    assert isinstance(error, BackendError)
    assert "status 7" in error.message and "no stderr" in error.message


def test_missing_program_is_backend_unavailable(tmp_path: Path) -> None:
    calls: list[bool] = []
    req = request(on_child=lambda child, started: calls.append(started))
    _, error = run(make([str(tmp_path / "no-such-agent-cli"), "{prompt}"]), req)
    assert isinstance(error, BackendUnavailable)
    assert "no-such-agent-cli" in error.message
    assert calls == []  # nothing started, nothing to record


def test_non_executable_program_is_backend_unavailable(tmp_path: Path) -> None:
    program = tmp_path / "not-executable"
    program.write_text("#!/bin/sh\necho hi\n")
    program.chmod(0o644)
    _, error = run(make([str(program)]), request())
    assert isinstance(error, BackendUnavailable)


# ---------------------------------------------------------------- no orphans


def test_timeout_kills_the_whole_process_group(leftovers: list[int]) -> None:
    backend = make([PY, "-c", SPAWNER, "devnull", "block"], timeout=1.0)
    started = time.monotonic()
    chunks, error = run(backend, request())
    elapsed = time.monotonic() - started
    child, child_pgid, grandchild, grandchild_pgid = parse_pids(text_of(chunks))
    leftovers += [child, grandchild]
    assert child_pgid == child  # the child leads its own group ...
    assert grandchild_pgid == child  # ... and the grandchild is in it
    assert isinstance(error, BackendTimeout)
    assert "timeout" in error.message
    assert elapsed < 10
    assert_group_gone(child, grandchild)


def test_timeout_escalates_to_sigkill_when_sigterm_is_ignored(leftovers: list[int]) -> None:
    script = (
        "import os, signal, subprocess, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "g = subprocess.Popen(['sleep', '300'], stdout=subprocess.DEVNULL)\n"
        "print('PIDS', os.getpid(), os.getpgid(0), g.pid, os.getpgid(g.pid), flush=True)\n"
        "time.sleep(300)\n"
    )
    backend = make([PY, "-c", script], timeout=0.5, kill_grace=0.3)
    chunks, error = run(backend, request())
    child, _, grandchild, _ = parse_pids(text_of(chunks))
    leftovers += [child, grandchild]
    assert isinstance(error, BackendTimeout)
    assert_group_gone(child, grandchild)


def test_cancelling_the_consumer_kills_the_group(leftovers: list[int]) -> None:
    backend = make([PY, "-c", SPAWNER, "devnull", "block"])
    calls: list[tuple[ChildProcess, bool]] = []
    req = request(on_child=lambda child, started: calls.append((child, started)))

    async def main() -> str:
        seen: asyncio.Queue[str] = asyncio.Queue()

        async def consume() -> None:
            async for chunk in backend.stream(req):
                seen.put_nowait(chunk.text)

        task = asyncio.create_task(consume())
        text = ""
        async with asyncio.timeout(20):
            while "\n" not in text:
                text += await seen.get()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return text

    text = asyncio.run(main())
    child, _, grandchild, _ = parse_pids(text)
    leftovers += [child, grandchild]
    assert_group_gone(child, grandchild)
    assert [started for _, started in calls] == [True, False]  # the end was reported too


@pytest.mark.parametrize("grandchild_stdout", ["devnull", "inherit"])
def test_grandchildren_left_after_a_normal_exit_are_killed(
    leftovers: list[int], grandchild_stdout: str
) -> None:
    # "inherit": the grandchild holds the stdout pipe open after the child exits; the stream
    # must still end when the child does (with a timeout set, it would otherwise only end as a
    # BackendTimeout; without one, never).
    backend = make([PY, "-c", SPAWNER, grandchild_stdout, "exit"], timeout=30)
    started = time.monotonic()
    chunks, error = run(backend, request())
    child, _, grandchild, _ = parse_pids(text_of(chunks))
    leftovers += [child, grandchild]
    assert error is None
    assert time.monotonic() - started < 10
    assert_group_gone(child, grandchild)


def test_on_child_reports_start_and_end_with_the_group() -> None:
    calls: list[tuple[ChildProcess, bool, bool, float | None]] = []

    def on_child(child: ChildProcess, started: bool) -> None:
        # At the start the child is alive; at the end its group is gone.
        created = psutil.Process(child.pgid).create_time() if started else None
        calls.append((child, started, bool(group_members(child.pgid)), created))

    script = "import os\nprint(os.getpid(), os.getpgid(0))"
    chunks, error = run(make([PY, "-c", script]), request(on_child=on_child))
    assert error is None
    pid, pgid = (int(x) for x in text_of(chunks).split())
    assert pgid == pid
    assert [(c.pgid, s) for c, s, _, _ in calls] == [(pid, True), (pid, False)]
    (start, _, _, created), (end, _, alive_at_end, _) = calls
    assert start == end
    # The start time is recorded so a reaper never signals a recycled pid.
    assert start.start_time is not None and created is not None
    assert abs(start.start_time - created) < 0.01
    assert alive_at_end is False


def test_timeout_covers_a_child_that_never_reads_its_prompt(leftovers: list[int]) -> None:
    # More prompt than a pipe holds, and the child sleeps without reading stdin: writing the
    # prompt must not block past the timeout.
    script = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(300)"
    backend = make([PY, "-c", script], timeout=1.0)
    started = time.monotonic()
    chunks, error = run(backend, request("p" * (1 << 20)))
    leftovers.append(int(text_of(chunks)))
    assert isinstance(error, BackendTimeout)
    assert time.monotonic() - started < 10
    wait_until(lambda: gone(leftovers[0]), 5, "child gone")


@pytest.mark.parametrize("outcome", ["fail", "timeout"])
def test_on_child_end_is_reported_on_failure_too(outcome: str) -> None:
    calls: list[bool] = []
    script = "import sys, time\nsys.exit(2)" if outcome == "fail" else "import time\ntime.sleep(60)"
    backend = make([PY, "-c", script], timeout=0.5)
    _, error = run(backend, request(on_child=lambda _c, started: calls.append(started)))
    assert isinstance(error, BackendTimeout if outcome == "timeout" else BackendError)
    assert calls == [True, False]
