"""Test corpora kept as files. ``hostile/`` holds task files the daemon must reject.

Each file there is listed in ``hostile/EXPECTED.toml`` with a substring its rejection reason must
contain; the unit tests parse them, the integration tests drop them into a running daemon.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

HOSTILE_DIR = Path(__file__).parent / "hostile"
# Files in HOSTILE_DIR that are not part of the corpus.
NOT_CORPUS = {"EXPECTED.toml", ".gitattributes"}


def hostile_corpus() -> dict[str, str]:
    """File name -> a substring its rejection reason must contain."""
    with open(HOSTILE_DIR / "EXPECTED.toml", "rb") as f:
        reasons: dict[str, str] = tomllib.load(f)["reasons"]
    return reasons
