"""A stand-in for an agent CLI (``claude --print``), run by the ``command`` backend in crash tests.

Usage: ``fake_cli.py LEDGER_DIR HOLD_DIR PROMPT``. The prompt is ``MARKER [word ...]`` where
MARKER is unique per task (tests find this process by it in ``psutil``) and the words ask for
behaviour:

- ``hold``: after the first output, wait until the file ``HOLD_DIR/<task id>`` exists;
- ``sleep=S``: after the first output, sleep S seconds;
- ``grandchild``: start a grandchild in this process's group (like a CLI that spawns helpers), so a
  test can check that the whole group dies, not only this process.

Every run appends ``begin ATTEMPT PID TIME`` to ``LEDGER_DIR/<task id>.log`` when it starts and
``end ATTEMPT PID TIME`` when it runs to completion: the ledger counts real runs, which the spool's
own records cannot.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HOLD_LIMIT = 120.0  # a forgotten hold file must not leave this process behind for ever


def ledger(directory: Path, task_id: str, line: str) -> None:
    fd = os.open(directory / f"{task_id}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def main() -> int:
    ledger_dir, hold_dir, prompt = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    task_id = os.environ["COORDINATOR_TASK_ID"]
    attempt = os.environ["COORDINATOR_ATTEMPT"]
    marker, *words = prompt.split()
    ledger(ledger_dir, task_id, f"begin {attempt} {os.getpid()} {time.time():.6f}")
    sys.stdout.write(f"partial output of {task_id}\n")
    sys.stdout.flush()
    if "grandchild" in words:
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(300)", f"{marker}-grandchild",
             str(ledger_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    for word in words:
        if word.startswith("sleep="):
            time.sleep(float(word.removeprefix("sleep=")))
    if "hold" in words:
        deadline = time.monotonic() + HOLD_LIMIT
        while not (hold_dir / task_id).exists():
            if time.monotonic() > deadline:
                return 1
            time.sleep(0.02)
    sys.stdout.write(f"rest of the answer for {task_id}\n")
    sys.stdout.flush()
    ledger(ledger_dir, task_id, f"end {attempt} {os.getpid()} {time.time():.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
