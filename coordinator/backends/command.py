"""``command``: drive an agent CLI such as ``claude --print`` as a child process.

The child runs in its own process group (so it and everything it starts can be killed as one),
gets ``COORDINATOR_TASK_ID`` and ``COORDINATOR_ATTEMPT`` in its environment, receives the prompt as
an argument where ``{prompt}`` appears in ``argv`` and on stdin otherwise, and never passes through
a shell. Its stdout, streamed, is the output; a non-zero exit fails the attempt. On timeout, on
cancel, and on any exit of the child, the whole group is killed: no orphans. If the agent itself
is killed with SIGKILL, the kernel kills the child (parent-death signal) and the reaper kills the
child's group from the agent's record.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field, field_validator

from coordinator.backends.base import ChildProcess, Chunk, InferenceRequest, ModelBackend
from coordinator.errors import BackendError, BackendTimeout, BackendUnavailable
from coordinator.proc import parent_death_preexec, process_start_time

STDERR_TAIL = 2000


class CommandOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1)
    timeout: float | None = Field(default=None, gt=0)  # seconds for one run of the command
    env: dict[str, str] = Field(default_factory=dict)  # added to the inherited environment
    cwd: str | None = None
    kill_grace: float = Field(default=5.0, ge=0)  # SIGTERM -> SIGKILL

    @field_validator("argv")
    @classmethod
    def _argv_program(cls, value: list[str]) -> list[str]:
        if not value[0] or "{prompt}" in value[0]:
            raise ValueError("argv[0] must be the program to run, not the prompt")
        return value


class CommandBackend(ModelBackend):
    """Runs ``argv`` once per task; see the module docstring for the contract."""

    name = "command"
    options_model = CommandOptions

    def __init__(self, options: BaseModel) -> None:
        assert isinstance(options, CommandOptions)
        self.options = options

    async def stream(self, request: InferenceRequest) -> AsyncIterator[Chunk]:
        opts = self.options
        use_stdin = not any("{prompt}" in arg for arg in opts.argv)
        argv = [arg.replace("{prompt}", request.prompt) for arg in opts.argv]
        env = {
            **os.environ,
            **opts.env,
            "COORDINATOR_TASK_ID": request.task_id,
            "COORDINATOR_ATTEMPT": str(request.attempt),
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if use_stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=opts.cwd,
                start_new_session=True,  # its own process group: killed whole
                preexec_fn=parent_death_preexec(),  # dies with the agent, even on SIGKILL
            )
        except OSError as exc:
            raise BackendUnavailable(f"cannot start {argv[0]!r}: {exc.strerror}") from exc
        child = ChildProcess(proc.pid, process_start_time(proc.pid))
        if request.on_child:
            request.on_child(child, True)
        stderr_task = asyncio.ensure_future(_read_all(proc.stderr))
        # asyncio's Process.wait() (and EOF on stdout) only comes once every copy of the pipes is
        # closed, and a grandchild that inherited stdout or stderr keeps them open after the
        # child has exited: the stream would hang until the timeout, or forever. So what is left
        # of the group is killed as soon as the child itself exits (the contract says so anyway).
        stragglers = asyncio.ensure_future(_kill_group_after_exit(proc, opts.kill_grace))
        feeder: asyncio.Future[None] | None = None
        # One deadline for the whole run, applied to each wait on the child separately: a timeout
        # scope must not span a ``yield``, or it fires in the consumer's code while this generator
        # is suspended and escapes as a bare CancelledError instead of BackendTimeout.
        loop = asyncio.get_running_loop()
        deadline = None if opts.timeout is None else loop.time() + opts.timeout
        try:
            if use_stdin:
                # Fed alongside the reads, not before them: a child that writes a lot before it
                # reads its prompt would otherwise deadlock with us on two full pipes, and one
                # that never reads stdin would block us past the timeout.
                assert proc.stdin is not None
                feeder = asyncio.ensure_future(_feed(proc.stdin, request.prompt.encode("utf-8")))
            assert proc.stdout is not None
            decoder = _Utf8Stream()
            while True:
                if deadline is not None and loop.time() >= deadline:
                    # Data already buffered is returned without waiting, so timeout_at alone
                    # would never fire for a child that keeps writing to a slow consumer.
                    raise TimeoutError
                async with asyncio.timeout_at(deadline):
                    chunk = await proc.stdout.read(4096)
                if not chunk:
                    break
                text = decoder.feed(chunk)
                if text:
                    yield Chunk(text=text)
            tail = decoder.feed(b"", final=True)
            if tail:
                yield Chunk(text=tail)
            async with asyncio.timeout_at(deadline):
                returncode = await proc.wait()
        except TimeoutError as exc:
            raise BackendTimeout(
                f"command {argv[0]!r} ran past its timeout of {opts.timeout}s and was killed"
            ) from exc
        finally:
            for helper in (feeder, stragglers):
                if helper is not None:
                    helper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await helper
            await _kill_group(proc, opts.kill_grace)
            if request.on_child:
                request.on_child(child, False)
            stderr = await stderr_task
        if returncode != 0:
            detail = stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL:]
            raise BackendError(
                f"command {argv[0]!r} exited with status {returncode}"
                + (f": {detail}" if detail else " (no stderr)")
            )


async def _feed(stdin: asyncio.StreamWriter, data: bytes) -> None:
    """Write the prompt to the child's stdin and close it; a child that exits unread is fine."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.write(data)
        await stdin.drain()
    stdin.close()


async def _kill_group_after_exit(proc: asyncio.subprocess.Process, grace: float) -> None:
    """Once the child has exited, kill what it left in its group (so its pipes close)."""
    # ``returncode`` is set when the child exits; ``wait()`` would also wait for the pipes.
    while proc.returncode is None:
        await asyncio.sleep(0.05)
    await _kill_group(proc, grace)


async def _read_all(stream: asyncio.StreamReader | None) -> bytes:
    if stream is None:
        return b""
    data = bytearray()
    while chunk := await stream.read(65536):
        data += chunk
        del data[: max(0, len(data) - 4 * STDERR_TAIL)]
    return bytes(data)


async def _kill_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """Kill the child's whole process group, politely first; also reaps the child."""
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        if proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await proc.wait()
        if proc.returncode is not None and not _group_exists(pgid):
            break
        if sig == signal.SIGTERM and proc.returncode is not None:
            continue  # the leader is gone; stragglers in its group get SIGKILL now
    if proc.returncode is None:
        await proc.wait()


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class _Utf8Stream:
    """Decode a byte stream to text without splitting a multi-byte character across chunks."""

    def __init__(self) -> None:
        import codecs

        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes, final: bool = False) -> str:
        return self._decoder.decode(data, final)
