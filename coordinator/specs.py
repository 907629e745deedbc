"""Load agent specs (``agents/<name>.toml``), validated at load time: a bad spec fails start-up."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import ValidationError

from coordinator.backends.base import validate_options
from coordinator.errors import ConfigError, describe_validation
from coordinator.models import AgentSpec, is_valid_name


def load_spec(path: Path) -> AgentSpec:
    """Read and validate one spec file; its name is the file's stem. Raises ``ConfigError``."""
    name = path.stem
    if not is_valid_name(name):
        raise ConfigError(f"{path}: {name!r} is not a valid agent spec name")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"agent spec {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read agent spec: {exc}") from exc
    raw.setdefault("name", name)
    if raw["name"] != name:
        raise ConfigError(f"{path}: name {raw['name']!r} differs from the file name {name!r}")
    try:
        spec = AgentSpec.model_validate(raw)
    except ValidationError as exc:
        problems = describe_validation(exc)
        raise ConfigError(f"{path}: invalid agent spec: {problems}") from exc
    try:
        validate_options(spec.backend, spec.backend_options)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from exc
    return spec


def load_specs(directory: Path) -> dict[str, AgentSpec]:
    """Every ``*.toml`` in ``directory``; an empty dict if the directory does not exist."""
    if not directory.is_dir():
        return {}
    specs = {}
    for path in sorted(directory.glob("*.toml")):
        if path.name.startswith("."):
            continue
        spec = load_spec(path)
        specs[spec.name] = spec
    return specs
