from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Home


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All state under tmp_path: no test reads or writes the checkout or the user's home."""
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("COORDINATOR_"):
            monkeypatch.delenv(key)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = Home(tmp_path / "home")
    try:
        yield h
    finally:
        h.stop_all()
