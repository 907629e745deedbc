"""Summarise py-spy's raw (collapsed) stacks: where an agent's time goes.

    .venv/bin/python -m bench.run --profile /tmp/prof --large 10000
    .venv/bin/python -m bench.profile_summary /tmp/prof/agent-*.txt

Prints, over all the files given: samples per thread kind (the event loop's thread, the
``asyncio.to_thread`` pool, watcher threads), the functions that hold the most samples
themselves ("self"), and the coordinator functions with the most samples under them
("inclusive"). py-spy samples only threads that are running, not idle ones, so the shares are
shares of busy time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse(line: str) -> tuple[list[str], int] | None:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if not stack or not count.isdigit():
        return None
    return stack.split(";"), int(count)


def where(frame: str, with_line: bool = False) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    name = f"{match['func']} ({match['file']}"
    return name + (f":{match['line']})" if with_line and match["line"] else ")")


def thread_kind(stack: list[str]) -> str:
    text = ";".join(stack[:8])
    if "_run_module_as_main" in text:
        return "event loop (main thread)"
    if "concurrent/futures/thread.py" in ";".join(stack[:6]):
        return "to_thread pool"
    if "inotify" in ";".join(stack):
        return "inotify watcher thread"
    return "other threads"


# Groups of frames worth knowing the inclusive cost of (a stack counts once per group).
GROUPS = {
    "logging (any Logger call)": "logging/__init__.py",
    "sqlite-utils (Store writes)": "sqlite_utils/",
    "pydantic (models, validation, dumps)": "pydantic/",
    "pathlib (building paths)": "pathlib.py",
    "json (dumps/loads)": "json/",
    "handing work to the thread pool (submit)": "ThreadPoolExecutor.submit",
}


def summarise(paths: list[Path], top: int) -> str:
    total = 0
    groups: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text().splitlines():
            parsed = parse(line)
            if parsed is None:
                continue
            stack, count = parsed
            total += count
            kinds[thread_kind(stack)] += count
            self_time[where(stack[-1], with_line=True)] += count
            for name in {where(f) for f in stack if "coordinator/" in f or "sqlite" in f}:
                inclusive[name] += count
            for group, needle in GROUPS.items():
                if any(needle in f for f in stack):
                    groups[group] += count
    out = [f"{total} samples in {len(paths)} file(s)", "", "by thread:"]
    out += [f"  {n / total:6.1%}  {k}" for k, n in kinds.most_common()]
    out += ["", "inclusive, by library:"]
    out += [f"  {n / total:6.1%}  {k}" for k, n in groups.most_common()]
    out += ["", f"self (top {top}):"]
    out += [f"  {n / total:6.1%}  {k}" for k, n in self_time.most_common(top)]
    out += ["", f"inclusive, coordinator and sqlite frames (top {top}):"]
    out += [f"  {n / total:6.1%}  {k}" for k, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(summarise(args.files, args.top))


if __name__ == "__main__":
    main()
