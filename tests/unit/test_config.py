"""Settings: defaults, file -> COORDINATOR_* -> overrides precedence, paths, clear errors.

Every test passes ``environ=`` explicitly: the real environment is never read or changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import Settings, load_settings
from coordinator.errors import ConfigError, ExitCode


def write_config(directory: Path, text: str, name: str = "coordinator.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_environment(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, environ={})
    assert settings.home == tmp_path
    assert settings.tasks_path == tmp_path / "tasks.d"
    assert settings.spool_path == tmp_path / "spool"
    assert settings.agents_path == tmp_path / "agents"
    assert settings.db_file == tmp_path / "coordinator.db"
    # The declared defaults, read from the model itself (declared once, not repeated here).
    for name, field in Settings.model_fields.items():
        if name != "home":
            assert getattr(settings, name) == field.get_default(call_default_factory=True), name
    assert settings.stall_timeout > settings.heartbeat_interval
    assert settings.log_format == "text"


def test_home_defaults_to_the_working_directory(tmp_path: Path) -> None:
    # conftest chdirs into tmp_path.
    assert load_settings(environ={}).home == Path.cwd()


def test_relative_home_is_made_absolute(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    settings = load_settings(Path("deploy"), environ={})
    assert settings.home.is_absolute()
    assert settings.home == tmp_path / "deploy"
    assert settings.spool_path == tmp_path / "deploy" / "spool"


def test_file_values_are_read(tmp_path: Path) -> None:
    write_config(tmp_path, 'stall_timeout = 12.5\nmax_task_bytes = 4096\nlog_format = "json"\n')
    settings = load_settings(tmp_path, environ={})
    assert settings.stall_timeout == 12.5
    assert settings.max_task_bytes == 4096
    assert settings.log_format == "json"


def test_environment_overrides_file_and_overrides_beat_both(tmp_path: Path) -> None:
    write_config(tmp_path, "stall_timeout = 12.5\nreap_interval = 3.0\nkill_grace = 2.0\n")
    env = {"COORDINATOR_STALL_TIMEOUT": "7", "COORDINATOR_REAP_INTERVAL": "0.75"}
    settings = load_settings(tmp_path, environ=env, overrides={"reap_interval": 0.25})
    assert settings.kill_grace == 2.0  # file only
    assert settings.stall_timeout == 7.0  # environment beats the file
    assert settings.reap_interval == 0.25  # overrides (flags) beat the environment


def test_none_overrides_do_not_hide_lower_layers(tmp_path: Path) -> None:
    # The CLI passes {"log_level": None} when the flag is absent.
    write_config(tmp_path, 'log_level = "DEBUG"\n')
    settings = load_settings(tmp_path, environ={}, overrides={"log_level": None})
    assert settings.log_level == "DEBUG"


def test_empty_and_foreign_environment_variables_are_ignored(tmp_path: Path) -> None:
    env = {
        "COORDINATOR_STALL_TIMEOUT": "",  # set but empty: as if unset
        "COORDINATOR_TASK_ID": "t1",  # what the command backend gives its children
        "STALL_TIMEOUT": "1",  # no prefix
        "coordinator_stall_timeout": "1",  # wrong case
    }
    settings = load_settings(tmp_path, environ=env)
    assert settings.stall_timeout == Settings.model_fields["stall_timeout"].default


def test_coordinator_home_from_environment(tmp_path: Path) -> None:
    home = tmp_path / "elsewhere"
    write_config(home, "kill_grace = 0.5\n")
    settings = load_settings(environ={"COORDINATOR_HOME": str(home)})
    assert settings.home == home
    assert settings.kill_grace == 0.5  # its coordinator.toml was read
    assert settings.tasks_path == home / "tasks.d"


def test_explicit_home_beats_coordinator_home(tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_config(other, "kill_grace = 0.5\n")
    settings = load_settings(tmp_path, environ={"COORDINATOR_HOME": str(other)})
    assert settings.home == tmp_path
    assert settings.kill_grace == Settings.model_fields["kill_grace"].default


def test_home_in_the_file_does_not_move_the_home(tmp_path: Path) -> None:
    write_config(tmp_path, f'home = "{tmp_path / "nowhere"}"\n')
    assert load_settings(tmp_path, environ={}).home == tmp_path


def test_coordinator_config_names_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "etc", "stall_timeout = 9\n", name="custom.toml")
    write_config(tmp_path, "stall_timeout = 1\n")  # the home's own file is not read
    settings = load_settings(tmp_path, environ={"COORDINATOR_CONFIG": str(config)})
    assert settings.stall_timeout == 9.0


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_settings(tmp_path, config_file=tmp_path / "nope.toml", environ={})
    assert str(tmp_path / "nope.toml") in info.value.message
    assert info.value.exit_code is ExitCode.USAGE


def test_relative_paths_in_the_file_resolve_against_its_folder(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "etc",
        'tasks_dir = "inbox"\nspool_dir = "../var/spool"\nagents_dir = "agents"\n'
        'db_path = "/abs/state.db"\n',
        name="c.toml",
    )
    settings = load_settings(tmp_path / "home", config_file=config, environ={})
    assert settings.tasks_path == tmp_path / "etc" / "inbox"
    assert settings.spool_path == tmp_path / "etc" / ".." / "var" / "spool"
    assert settings.agents_path == tmp_path / "etc" / "agents"
    assert settings.db_file == Path("/abs/state.db")


def test_relative_config_file_path_still_gives_absolute_paths(tmp_path: Path) -> None:
    # The daemon hands its settings to agents as JSON; a path relative to the daemon's working
    # directory would mean something else to a process started elsewhere.
    write_config(tmp_path / "etc", 'tasks_dir = "inbox"\n', name="c.toml")
    settings = load_settings(tmp_path, config_file=Path("etc/c.toml"), environ={})
    assert settings.tasks_path.is_absolute()
    assert settings.tasks_path == tmp_path / "etc" / "inbox"


def test_relative_paths_in_the_environment_resolve_against_home(tmp_path: Path) -> None:
    env = {"COORDINATOR_TASKS_DIR": "incoming", "COORDINATOR_DB_PATH": "/var/x.db"}
    settings = load_settings(tmp_path, environ=env)
    assert settings.tasks_path == tmp_path / "incoming"
    assert settings.db_file == Path("/var/x.db")


def test_unknown_key_in_file_names_the_key_and_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "stall_timeout = 3\nstal_timeout = 4\n")
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, environ={})
    assert "stal_timeout" in info.value.message
    assert str(path) in info.value.message
    assert info.value.exit_code is ExitCode.USAGE


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('stall_timeout = "soon"\n', "stall_timeout"),
        ("stall_timeout = 0\n", "stall_timeout"),
        ("max_task_bytes = 10\n", "max_task_bytes"),
        ('log_format = "xml"\n', "log_format"),
        ("default_max_attempts = 0\n", "default_max_attempts"),
        ("crash_loop_restarts = 1.5\n", "crash_loop_restarts"),
        ("tasks_dir = 5\n", "tasks_dir"),
        ('spool_dir = ["a", "b"]\n', "spool_dir"),
    ],
)
def test_bad_file_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, environ={})
    assert key in info.value.message


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("COORDINATOR_STALL_TIMEOUT", "soon", "stall_timeout"),
        ("COORDINATOR_KILL_GRACE", "-1", "kill_grace"),
        ("COORDINATOR_LOG_FORMAT", "xml", "log_format"),
        ("COORDINATOR_MAX_TASK_BYTES", "1.5", "max_task_bytes"),
    ],
)
def test_bad_environment_value_names_the_key(
    tmp_path: Path, variable: str, value: str, key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, environ={variable: value})
    assert key in info.value.message
    assert "COORDINATOR_" in info.value.message


def test_bad_override_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="log_format"):
        load_settings(tmp_path, environ={}, overrides={"log_format": "xml"})


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "stall_timeout = \n")
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_settings(tmp_path, environ={})
    assert str(path) in info.value.message


def test_settings_are_frozen_and_round_trip_through_json(tmp_path: Path) -> None:
    # The daemon hands its exact settings to its agents as JSON.
    write_config(tmp_path, 'stall_timeout = 4\ntasks_dir = "in"\n')
    settings = load_settings(tmp_path, environ={})
    again = Settings.model_validate_json(settings.model_dump_json())
    assert again == settings
    with pytest.raises(ValueError, match="frozen"):
        settings.stall_timeout = 1.0  # type: ignore[misc]
