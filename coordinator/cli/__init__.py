"""The ``coordinator`` command line (click), thin over the library. Nothing imports this package.

Every command has ``--help``; every reporting command has ``--json`` with a stable schema
(docs/cli.md). Errors map to exit codes through ``coordinator.errors.ExitCode`` only.
"""

from __future__ import annotations

import sys

from coordinator.cli import commands, daemon_commands  # noqa: F401  (registers commands)
from coordinator.cli.app import cli
from coordinator.errors import ExitCode


def main() -> None:
    try:
        cli.main(prog_name="coordinator", standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(ExitCode.TEMPORARY)
