"""Agent specs are validated at load time: a bad one is a ConfigError naming the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.errors import ConfigError, ExitCode
from coordinator.specs import load_spec, load_specs
from tests.support import Home, clean_env


def write_spec(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert str(path) in info.value.message  # every spec error says which file
    assert info.value.exit_code is ExitCode.USAGE
    return info.value


def test_valid_echo_spec(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "writer", (
        'backend = "echo"\nprocesses = 3\nconcurrency = 2\ndescription = "demo"\n'
        'system_prompt = "Be brief."\nstall_timeout = 12.0\n'
        '[backend_options]\ntoken_delay_ms = 5\nprefix = "> "\n'
    ))
    spec = load_spec(path)
    assert spec.name == "writer"  # from the file's stem
    assert spec.backend == "echo"
    assert (spec.processes, spec.concurrency) == (3, 2)
    assert spec.system_prompt == "Be brief."
    assert spec.stall_timeout == 12.0
    assert spec.backend_options == {"token_delay_ms": 5, "prefix": "> "}


def test_valid_command_spec_with_explicit_matching_name(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "claude", (
        'name = "claude"\nbackend = "command"\n'
        '[backend_options]\nargv = ["claude", "--print", "{prompt}"]\ntimeout = 600\n'
        'env = { CLAUDE_NO_COLOR = "1" }\n'
    ))
    spec = load_spec(path)
    assert spec.name == "claude"
    assert spec.backend == "command"
    assert spec.backend_options["argv"] == ["claude", "--print", "{prompt}"]
    assert spec.processes == 1 and spec.concurrency == 1  # defaults


def test_shipped_example_spec_loads() -> None:
    repo = Path(__file__).resolve().parents[2]
    spec = load_spec(repo / "agents" / "echo.toml")
    assert spec.backend == "echo"


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "a", 'backend = "echo"\nproceses = 2\n')
    assert "proceses" in load_error(path).message


def test_unknown_backend_lists_installed_backends(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "a", 'backend = "gpt9000"\n')
    message = load_error(path).message
    assert "gpt9000" in message
    assert "installed backends" in message
    assert "echo" in message and "command" in message


def test_missing_backend(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "a", "processes = 1\n")
    assert "backend" in load_error(path).message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('backend = "echo"\nprocesses = -1\n', "processes"),
        ('backend = "echo"\nconcurrency = 0\n', "concurrency"),
        ('backend = "echo"\nstall_timeout = 0\n', "stall_timeout"),
        ('backend = "echo"\n[backend_options]\ntoken_delay = 5\n', "token_delay"),
        ('backend = "echo"\n[backend_options]\ntoken_delay_ms = -5\n', "token_delay_ms"),
        ('backend = "command"\n', "argv"),
        ('backend = "command"\n[backend_options]\nargv = []\n', "argv"),
        ('backend = "command"\n[backend_options]\nargv = ["{prompt}"]\n', "argv[0]"),
        ('backend = "command"\n[backend_options]\nargv = ["x{prompt}", "-p"]\n', "argv[0]"),
        ('backend = "command"\n[backend_options]\nargv = ["", "-p"]\n', "argv"),
        ('backend = "command"\n[backend_options]\nargv = ["x"]\ntimeout = 0\n', "timeout"),
        ('backend = "command"\n[backend_options]\nargv = ["x"]\nshell = true\n', "shell"),
    ],
)
def test_bad_spec_values(tmp_path: Path, text: str, expected: str) -> None:
    path = write_spec(tmp_path, "a", text)
    assert expected in load_error(path).message


def test_backend_options_errors_name_the_backend(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path, "a", 'backend = "command"\n[backend_options]\nargv = ["{prompt}"]\n'
    )
    message = load_error(path).message
    assert "backend_options" in message and "command" in message
    assert "program" in message  # says what argv[0] must be


def test_name_differs_from_file_name(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "writer", 'name = "reader"\nbackend = "echo"\n')
    message = load_error(path).message
    assert "reader" in message and "writer" in message


def test_invalid_file_name(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "-rf", 'backend = "echo"\n')
    assert "not a valid agent spec name" in load_error(path).message


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write_spec(tmp_path, "a", 'backend = "echo\n')
    assert "cannot read" in load_error(path).message


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in load_error(tmp_path / "ghost.toml").message


def test_load_specs_reads_every_toml_and_skips_hidden_and_other_files(tmp_path: Path) -> None:
    write_spec(tmp_path, "b", 'backend = "echo"\n')
    write_spec(tmp_path, "a", 'backend = "command"\n[backend_options]\nargv = ["true"]\n')
    (tmp_path / ".hidden.toml").write_text("this is not toml at all [")
    (tmp_path / "notes.md").write_text("not a spec")
    (tmp_path / "claude.toml.example").write_text("not loaded")
    specs = load_specs(tmp_path)
    assert sorted(specs) == ["a", "b"]
    assert specs["a"].backend == "command"


def test_load_specs_fails_on_the_first_bad_spec(tmp_path: Path) -> None:
    write_spec(tmp_path, "good", 'backend = "echo"\n')
    bad = write_spec(tmp_path, "zbad", 'backend = "nope"\n')
    with pytest.raises(ConfigError) as info:
        load_specs(tmp_path)
    assert str(bad) in info.value.message


def test_load_specs_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert load_specs(tmp_path / "absent") == {}


def test_daemon_refuses_to_start_with_a_bad_spec(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.echo_spec("good")
    bad = write_spec(home.agents, "broken", (
        'backend = "command"\n[backend_options]\nargv = ["{prompt}", "--print"]\n'
    ))
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", "--home", str(home.root), "run"],
        capture_output=True, timeout=60, env=clean_env(),
    )
    assert result.returncode == 2, result.stderr
    stderr = result.stderr.decode()
    assert "coordinator: error:" in stderr
    assert str(bad) in stderr
    assert "argv" in stderr
    assert "Traceback" not in stderr
    # It refused before taking the lock or starting anything: nothing claims to be running.
    assert home.cli("status").returncode == 3
