"""Start a command line program with its imports done, then wait for "go" on stdin.

    python -m bench.launch coordinator --home H agent --spec S --exit-when-idle
    python -m bench.launch rename-loop QUEUE CLAIMS DONE

Python start-up and imports take a few hundred milliseconds, which would let the first agent
drain a small queue alone before the second one exists. The benchmark starts both agents
through this launcher, waits until both are ready, then releases them together. After "go"
the program runs exactly as ``python -m coordinator ...`` would (same ``main``, same argv).
"""

from __future__ import annotations

import sys


def main() -> None:
    program, args = sys.argv[1], sys.argv[2:]
    if program == "coordinator":
        import importlib.metadata

        import coordinator.backends.echo  # noqa: F401  (what the agent would import lazily)
        from coordinator.cli import main as entry

        importlib.metadata.entry_points(group="coordinator.backends")
    elif program == "rename-loop":
        from bench.rename_loop import main as entry
    else:
        raise SystemExit(f"unknown program {program!r}")
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("not released")
    if program == "coordinator":
        import os

        os.dup2(2, 1)  # the agent writes nothing to stdout; never let a full pipe block it
    sys.argv = [program, *args]
    entry()


if __name__ == "__main__":
    main()
