"""The root command group, settings loading and error-to-exit-code mapping."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from coordinator import __version__, logs
from coordinator.config import Settings, load_settings
from coordinator.errors import CoordinatorError, ExitCode, exit_code_for

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    def __init__(self, home: Path | None, config: Path | None, overrides: dict[str, Any]) -> None:
        self._home = home
        self._config = config
        self._overrides = overrides
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self._home, self._config, overrides=self._overrides)
        return self._settings

    def use_settings_file(self, path: Path) -> None:
        """Take the exact settings a daemon wrote for its agents (one truth for the fleet)."""
        try:
            self._settings = Settings.model_validate_json(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise click.UsageError(f"cannot read settings file {path}: {exc}") from exc


def handle_errors(func: F) -> F:
    """Turn a ``CoordinatorError`` into a message on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CoordinatorError as exc:
            click.echo(f"coordinator: error: {exc.message}", err=True)
            sys.exit(exit_code_for(exc))

    return wrapper  # type: ignore[return-value]


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="coordinator")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="COORDINATOR_HOME",
    help="Deployment root (config, agents/, tasks.d/, spool/, database). Default: current dir.",
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="COORDINATOR_CONFIG",
    help="Config file. Default: HOME/coordinator.toml if it exists.",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Log line format on stderr.")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR.")
@click.pass_context
def cli(
    ctx: click.Context,
    home: Path | None,
    config: Path | None,
    log_format: str | None,
    log_level: str | None,
) -> None:
    """fleet-coordinator: keep a fleet of LLM agents busy.

    Drop task files into tasks.d/ (or use `coordinator submit`); `coordinator run` validates and
    queues them and keeps agent processes working on them, most urgent first.
    """
    ctx.obj = Context(home, config, {"log_format": log_format, "log_level": log_level})


def configure_logging(ctx: Context) -> None:
    try:
        settings = ctx.settings
    except CoordinatorError as exc:
        click.echo(f"coordinator: error: {exc.message}", err=True)
        sys.exit(ExitCode.USAGE)
    logs.configure(settings.log_format, settings.log_level)
