"""Settings: every default declared once, loaded from file, then environment, then flags.

``COORDINATOR_HOME`` (or ``--home``) roots one deployment. Inside it, unless the config file moves
them: ``coordinator.toml`` (optional), ``agents/*.toml``, ``tasks.d/``, ``spool/`` and
``coordinator.db``. Library code never reads the environment; :func:`load_settings` does, once,
for the CLI.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator.errors import ConfigError, describe_validation

ENV_PREFIX = "COORDINATOR_"
CONFIG_FILENAME = "coordinator.toml"


class Settings(BaseModel):
    """The whole configuration of one deployment (a home directory)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path = Field(default_factory=Path.cwd)
    tasks_dir: Path | None = None  # default: HOME/tasks.d
    spool_dir: Path | None = None  # default: HOME/spool
    agents_dir: Path | None = None  # default: HOME/agents
    db_path: Path | None = None  # default: HOME/coordinator.db

    max_task_bytes: int = Field(default=1_048_576, ge=64)  # a bigger task file is rejected
    max_prompt_chars: int = Field(default=500_000, ge=1)
    default_max_attempts: int = Field(default=3, ge=1)
    rescan_interval: float = Field(default=2.0, gt=0)  # safety net for missed inotify events
    settle_timeout: float = Field(default=10.0, gt=0)  # a file still changing after this: rejected
    reap_interval: float = Field(default=0.5, gt=0)
    heartbeat_interval: float = Field(default=1.0, gt=0)
    stall_timeout: float = Field(default=30.0, gt=0)  # no heartbeat for this long: stalled
    kill_grace: float = Field(default=5.0, ge=0)  # SIGTERM -> SIGKILL for a stalled agent or child
    shutdown_grace: float = Field(default=30.0, ge=0)  # agents finish in-flight tasks this long
    restart_backoff: float = Field(default=0.5, gt=0)  # first restart delay of a crashed agent
    restart_backoff_max: float = Field(default=30.0, gt=0)
    crash_loop_restarts: int = Field(default=5, ge=1)  # this many crashes ...
    crash_loop_window: float = Field(default=60.0, gt=0)  # ... within this window: give up
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    @property
    def tasks_path(self) -> Path:
        return self.tasks_dir or self.home / "tasks.d"

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or self.home / "spool"

    @property
    def agents_path(self) -> Path:
        return self.agents_dir or self.home / "agents"

    @property
    def db_file(self) -> Path:
        return self.db_path or self.home / "coordinator.db"


def _coerce_env(values: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in values.items():
        if not key.startswith(ENV_PREFIX) or not raw:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in Settings.model_fields:
            out[name] = raw
    return out


def _resolve_relative(data: dict[str, Any], base: Path) -> dict[str, Any]:
    for key in ("tasks_dir", "spool_dir", "agents_dir", "db_path"):
        value = data.get(key)
        # Only strings are paths here; any other type (``tasks_dir = 5``) is left for pydantic,
        # whose ConfigError names the key, instead of escaping as a bare TypeError from Path().
        if isinstance(value, str) and not Path(value).is_absolute():
            data[key] = base / value
    return data


def load_settings(
    home: Path | None = None,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: config file, then ``COORDINATOR_*`` variables, then ``overrides``.

    Raises ``ConfigError`` with the offending key and source when anything is invalid.
    """
    env = dict(os.environ if environ is None else environ)
    env_values = _coerce_env(env)
    if home is None:
        home = Path(env_values.pop("home", None) or Path.cwd())
    else:
        env_values.pop("home", None)
    home = Path(home).absolute()
    if config_file is None and env.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(env[ENV_PREFIX + "CONFIG"])
    env_values.pop("config", None)
    file_values: dict[str, Any] = {}
    path = config_file or home / CONFIG_FILENAME
    if path.exists():
        try:
            file_values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        file_values.pop("home", None)
        # absolute(): with a relative --config the paths would otherwise stay relative to this
        # process's working directory, and mean something else to an agent started elsewhere.
        file_values = _resolve_relative(file_values, path.absolute().parent)
    elif config_file is not None:
        raise ConfigError(f"config file {config_file} does not exist")
    data: dict[str, Any] = {**file_values, **_resolve_relative(env_values, home)}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    data["home"] = home
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = describe_validation(exc)
        raise ConfigError(
            f"invalid configuration ({path} and {ENV_PREFIX}* variables): {problems}"
        ) from exc
