"""The practical ceiling: a minimal rename-based claim loop, with none of the coordinator's work.

One worker lists the queue once, sorts it (claim order), then for each token renames it into
``claims/`` (the claim; of racing workers exactly one wins) and from there into ``done/`` (the
completion). No task file is read, no pipeline runs, no result is written, nothing is flushed.
Prints one JSON line: how many it completed, and when it started and finished.

    python -m bench.rename_loop QUEUE CLAIMS DONE WORKER_NAME
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    queue, claims, done, worker = sys.argv[1:5]
    started = time.time()
    names = sorted(os.listdir(queue))
    completed = 0
    first = last = 0.0
    for name in names:
        claim = os.path.join(claims, f"{name}~{worker}")
        try:
            os.rename(os.path.join(queue, name), claim)
        except FileNotFoundError:
            continue  # the other worker took it
        os.rename(claim, os.path.join(done, name))
        completed += 1
        last = time.time()
        if completed == 1:
            first = last
    print(json.dumps({"worker": worker, "completed": completed, "started": started,
                      "first": first, "last": last}), flush=True)


if __name__ == "__main__":
    main()
