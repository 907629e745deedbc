"""One exception tree for the whole package, and the one table of exit codes.

Every error the package raises on purpose is a ``CoordinatorError``; foreign exceptions are
translated where they cross into the package (``raise SpoolError(...) from exc``). The CLI maps an
error to its process exit code with :func:`exit_code_for` and nothing else.
"""

from __future__ import annotations

import enum
from typing import Any


class ExitCode(enum.IntEnum):
    """Process exit codes of every ``coordinator`` command (a contract: scripts rely on them)."""

    OK = 0
    UNEXPECTED = 1
    USAGE = 2  # usage or configuration error: fix the command line, the config or the spec
    NOT_RUNNING = 3  # the daemon is not running
    CONFLICT = 4  # the request conflicts with the task's state (e.g. cancel a done task)
    TEMPORARY = 75  # EX_TEMPFAIL: try again later


class CoordinatorError(Exception):
    """Something went wrong in fleet-coordinator."""

    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(CoordinatorError):
    """The configuration or an agent spec is invalid."""

    exit_code = ExitCode.USAGE


class TaskFileError(CoordinatorError):
    """A task file is invalid; the message says what is wrong and how to fix it."""

    exit_code = ExitCode.USAGE


class SpoolError(CoordinatorError):
    """The spool could not be read or written."""

    exit_code = ExitCode.TEMPORARY


class TaskNotFound(SpoolError):
    """No task with that id."""

    exit_code = ExitCode.USAGE


class StateConflict(SpoolError):
    """The task is not in a state that allows this operation."""

    exit_code = ExitCode.CONFLICT


class ClaimLost(SpoolError):
    """This attempt no longer holds the claim (reclaimed, cancelled or superseded)."""

    exit_code = ExitCode.CONFLICT


class AlreadyRunning(CoordinatorError):
    """Another daemon already runs on this home."""

    exit_code = ExitCode.CONFLICT


class DaemonNotRunning(CoordinatorError):
    """The daemon is not running."""

    exit_code = ExitCode.NOT_RUNNING


class StoreError(CoordinatorError):
    """The state database could not be read or written."""

    exit_code = ExitCode.TEMPORARY


class BackendError(CoordinatorError):
    """The model backend failed."""

    exit_code = ExitCode.TEMPORARY
    retryable: bool = True


class BackendTimeout(BackendError):
    """The model backend did not answer in time."""


class BackendUnavailable(BackendError):
    """The model backend cannot be reached."""


class BackendRejected(BackendError):
    """The model backend refused the request; retrying the same request will not help."""

    retryable = False


def describe_validation(exc: Any) -> str:
    """``loc: msg; loc: msg`` for a pydantic ``ValidationError`` (one line for a message)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
    )


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code for an exception that reached the CLI."""
    if isinstance(exc, CoordinatorError):
        return exc.exit_code
    return ExitCode.UNEXPECTED
