"""Run the fleet benchmarks and their peers side by side, print a table, optionally save JSON.

    .venv/bin/python -m bench.run              full size (1k and 100k tasks), about 8 minutes
    .venv/bin/python -m bench.run --quick      a smoke run (200 and 2k tasks), under a minute
    .venv/bin/python -m bench.run --json out.json

See bench/README.md for what each number means and how it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fleet, peers
from bench.harness import machine, median_by

GOALS = {
    "drain_vs_huey": 5.0,  # coordinator drain rate >= 5x SqliteHuey's (2 workers)
    "large_vs_small": 0.8,  # rate at the large queue >= 80% of the rate at the small one
    "claim_p50_ms": 3.0,
    "claim_p99_ms": 20.0,
    "intake_rate": 2000.0,  # files/s accepted durably, no agents
    "daemon_rss_mb": 150.0,  # at the large queue pending
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke sizes (200 / 2000 tasks)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write every number here")
    p.add_argument("--small", type=int, help="the small queue (default 1000)")
    p.add_argument("--large", type=int, help="the large queue (default 100000)")
    p.add_argument("--repeats", type=int, help="runs of each small drain; the median is kept")
    p.add_argument("--huey-fsync-max", type=int, default=20_000,
                   help="cap on the large SqliteHuey-with-fsync drain, which runs at a few "
                        "hundred tasks/s on a slow-fsync disk (default 20000)")
    p.add_argument("--samples", type=int, help="idle latency samples (default 200)")
    p.add_argument("--gap-ms", type=float, default=20.0,
                   help="idle gap before each latency sample: GAP..2*GAP ms (default 20)")
    p.add_argument("--agents", type=int, default=2, help="agent processes / Huey workers")
    p.add_argument("--concurrency", type=int, default=4,
                   help="tasks per agent at once (default 4, as the shipped agents/echo.toml)")
    p.add_argument("--only", choices=["latency", "small", "large"], action="append",
                   help="run only these sections (repeatable)")
    p.add_argument("--workdir", type=Path, help="where temporary homes go (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary homes")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="instead of the benchmark: one intake + drain of --large tasks with "
                        "py-spy recording each agent into DIR (numbers are not comparable)")
    p.add_argument("--profile-flags", default="",
                   help='extra py-spy record flags, e.g. "--gil" (CPU only) or "--idle"')
    args = p.parse_args(argv)
    args.small = args.small or (200 if args.quick else 1000)
    args.large = args.large or (2000 if args.quick else 100_000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.samples = args.samples or (30 if args.quick else 200)
    return args


LOAD: list[tuple[str, float]] = []  # (what was starting, 1-minute load average then)


def log(message: str) -> None:
    load = os.getloadavg()[0]
    LOAD.append((message, load))
    print(f"[{time.strftime('%H:%M:%S')}] load {load:.2f}  {message}", file=sys.stderr,
          flush=True)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sections = set(args.only or ["latency", "small", "large"])
    report: dict[str, Any] = {"machine": machine(), "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    n = [0]

    def home(label: str) -> Path:
        n[0] += 1
        return work / f"{n[0]:02d}-{label}"

    if "latency" in sections:
        log(f"idle latency: coordinator, {args.samples} samples")
        report["latency"] = fleet.idle_latency(home("latency"), args.samples, args.gap_ms,
                                               agents=args.agents,
                                               concurrency=args.concurrency)
        log("idle latency: huey")
        report["huey_latency"] = peers.huey_latency(home("huey-latency"), args.samples,
                                                    args.gap_ms)
    for size_name, count in (("small", args.small), ("large", args.large)):
        if size_name not in sections:
            continue
        repeats = args.repeats if size_name == "small" else 1
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "huey": [], "huey_nosync": [],
                                                 "rename": []}
        for r in range(repeats):
            log(f"{size_name} ({count}) run {r + 1}/{repeats}: coordinator")
            runs["ours"].append(fleet.intake_and_drain(
                home(f"fleet-{count}"), count, agents=args.agents,
                concurrency=args.concurrency))
            huey_n = min(count, args.huey_fsync_max)
            log(f"{size_name} run {r + 1}/{repeats}: huey with fsync ({huey_n})")
            runs["huey"].append(peers.huey_drain(home(f"huey-{huey_n}"), huey_n))
            log(f"{size_name} run {r + 1}/{repeats}: huey without fsync ({count})")
            runs["huey_nosync"].append(peers.huey_drain(home(f"huey-nosync-{count}"), count,
                                                        nosync=True))
            log(f"{size_name} run {r + 1}/{repeats}: rename loop")
            runs["rename"].append(peers.rename_loop(home(f"rename-{count}"), count))
            if not args.keep:
                for path in work.iterdir():
                    if "latency" not in path.name:
                        remove(path)
        report[size_name] = {
            "n": count,
            "ours": median_by([r["drain"] | {"_run": r} for r in runs["ours"]], "rate")["_run"],
            "huey": median_by(runs["huey"], "rate"),
            "huey_nosync": median_by(runs["huey_nosync"], "rate"),
            "rename": median_by(runs["rename"], "rate"),
            "all_runs": runs,
        }
    log("done")
    report["load_average_1min"] = LOAD
    report["goals"] = goals(report)
    return report


def remove(path: Path) -> None:
    """Delete a home; ``rm -rf`` is several times faster than shutil on 700k inodes."""
    if subprocess.run(["rm", "-rf", str(path)], check=False).returncode != 0:
        shutil.rmtree(path, ignore_errors=True)


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, target: str, met: bool | None) -> None:
        out.append({"goal": name, "measured": measured, "target": target, "met": met})

    large, small = report.get("large"), report.get("small")
    if large:
        ours, huey = large["ours"]["drain"]["rate"], large["huey"]["rate"]
        add("1. drain rate vs SqliteHuey (fsync, large)", ours / huey,
            f">= {GOALS['drain_vs_huey']:.0f}x", ours / huey >= GOALS["drain_vs_huey"])
        nosync = large["huey_nosync"]["rate"]
        add("1b. drain rate vs SqliteHuey (fsync off, large)", ours / nosync,
            f">= {GOALS['drain_vs_huey']:.0f}x", ours / nosync >= GOALS["drain_vs_huey"])
    if large and small:
        ratio = large["ours"]["drain"]["rate"] / small["ours"]["drain"]["rate"]
        add("2. drain rate large / small", ratio, f">= {GOALS['large_vs_small']:.0%}",
            ratio >= GOALS["large_vs_small"])
    if "latency" in report:
        claim = report["latency"]["drop_to_claim_ms"]
        add("3. idle drop -> claim p50 (ms)", claim.get("p50"),
            f"<= {GOALS['claim_p50_ms']:.0f}", claim.get("p50", 1e9) <= GOALS["claim_p50_ms"])
        add("3. idle drop -> claim p99 (ms)", claim.get("p99"),
            f"<= {GOALS['claim_p99_ms']:.0f}", claim.get("p99", 1e9) <= GOALS["claim_p99_ms"])
    if large:
        rate = large["ours"]["intake"]["rate"]
        add("4. intake burst (files/s, large)", rate, f">= {GOALS['intake_rate']:.0f}",
            rate >= GOALS["intake_rate"])
        rss = large["ours"]["daemon_rss_pending"] / 2**20
        add("5. daemon RSS at large pending (MB)", rss, f"<= {GOALS['daemon_rss_mb']:.0f}",
            rss <= GOALS["daemon_rss_mb"])
    runs = [r["drain"] for s in ("small", "large") if s in report
            for r in report[s]["all_runs"]["ours"]]
    if "latency" in report:
        runs.append(report["latency"])
    if runs:
        bad = sum(r["check"]["lost"] + r["check"]["duplicates"] for r in runs)
        add("6. lost + duplicated tasks, all coordinator runs", bad, "0",
            all(r["clean"] for r in runs))
    return out


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    dirty = ", ".join(m["git"]["dirty"]) or "clean"
    lines = [
        f"machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['memory_gb']} GB, Python "
        f"{m['python']}, kernel {m['kernel']}, {m['filesystem']}; commit {m['git']['commit']} "
        f"({dirty})",
    ]
    loads = [load for _, load in report.get("load_average_1min", [])]
    if loads:
        lines.append(f"1-minute load average at section starts: {min(loads):.2f} .. "
                     f"{max(loads):.2f} (the benchmark's own processes add up to ~3 while they "
                     f"drain; more means other work shared the {m['nproc']} CPUs)")
    sizes = [s for s in ("small", "large") if s in report]
    if sizes:
        head = "".join(f"{report[s]['n']:>14,}" for s in sizes)
        lines += ["", f"{'drain rate, tasks/s (2 agents / 2 workers)':<58}{head}"]

        def row(label: str, get: Any) -> None:
            cells = "".join(f"{get(report[s]):>14}" for s in sizes)
            lines.append(f"  {label:<56}{cells}")

        row("coordinator: claim + echo pipeline + durable result",
            lambda s: _rate(s["ours"]["drain"]["rate"]))
        row("  same, counted from agent release (incl. start-up)",
            lambda s: _rate(s["ours"]["drain"].get("rate_from_release")))
        row("  same, first 10% of the queue (deepest backlog)",
            lambda s: _rate(s["ours"]["drain"].get("rate_first_10pct")))
        row("SqliteHuey, 2 process workers, defaults (fsync)",
            lambda s: _rate(s["huey"]["rate"]) + (f" ({s['huey']['n'] // 1000}k)"
                                                  if s["huey"]["n"] != s["n"] else ""))
        row("SqliteHuey, 2 process workers, fsync off",
            lambda s: _rate(s["huey_nosync"]["rate"]))
        row("rename loop: 2 renames per task, nothing else",
            lambda s: _rate(s["rename"]["rate"]))
        row("ratio coordinator / SqliteHuey (fsync)",
            lambda s: f"{s['ours']['drain']['rate'] / s['huey']['rate']:.2f}x")
        row("ratio coordinator / SqliteHuey (fsync off)",
            lambda s: f"{s['ours']['drain']['rate'] / s['huey_nosync']['rate']:.2f}x")
        row("ratio coordinator / rename loop",
            lambda s: f"{s['ours']['drain']['rate'] / s['rename']['rate']:.3f}x")
        row("CPU ms per task: coordinator agents (sum of 2)",
            lambda s: _ms(s["ours"]["drain"].get("cpu_ms_per_task")))
        row("CPU ms per task: Huey consumer + workers (fsync)",
            lambda s: _ms(s["huey"].get("cpu_ms_per_task")))
        row("CPU ms per task: Huey consumer + workers (fsync off)",
            lambda s: _ms(s["huey_nosync"].get("cpu_ms_per_task")))
        row("CPU ms per task: rename loop",
            lambda s: _ms(s["rename"].get("cpu_ms_per_task")))
        row("intake: files accepted durably per s (no agents)",
            lambda s: _rate(s["ours"]["intake"]["rate"]))
        row("  daemon CPU ms per file during intake (incl. start-up)",
            lambda s: _ms(1000 * s["ours"]["intake"]["daemon_cpu_seconds"] / s["n"]
                          if s["ours"]["intake"].get("daemon_cpu_seconds") else None))
        row("daemon RSS with the queue pending, MB",
            lambda s: f"{s['ours']['daemon_rss_pending'] / 2**20:.1f}")
        row("daemon RSS peak (intake + drain), MB",
            lambda s: f"{s['ours']['daemon_rss_peak'] / 2**20:.1f}")
        row("agent RSS peak, MB (each)",
            lambda s: "/".join(f"{b / 2**20:.0f}" for b in s["ours"]["drain"]["agent_rss_peak"]))
        row("Huey consumer RSS peak (all processes), MB",
            lambda s: f"{s['huey']['rss_peak'] / 2**20:.0f}")
    if "latency" in report:
        lat, hl = report["latency"], report["huey_latency"]
        lines += ["", f"{'idle latency, ms (' + str(lat['samples']) + ' samples)':<58}"
                  f"{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"]
        for label, stats in (
            ("coordinator: drop -> queue token (intake)", lat["drop_to_queued_ms"]),
            ("coordinator: drop -> claim rename (inotify)", lat["drop_to_claim_ms"]),
            ("coordinator: drop -> attempt start record", lat["drop_to_start_record_ms"]),
            ("coordinator: drop -> durable result (end record)", lat["drop_to_done_ms"]),
            ("Huey (fsync): enqueue -> task start", hl["enqueue_to_start_ms"]),
        ):
            cells = "".join(f"{stats.get(k, float('nan')):>8.2f}"
                            for k in ("p50", "p90", "p99", "max"))
            lines.append(f"  {label:<56}{cells}")
    if report["goals"]:
        lines += ["", "goals"]
        for g in report["goals"]:
            verdict = {True: "MET", False: "NOT MET", None: "?"}[g["met"]]
            value = g["measured"]
            shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
            lines.append(f"  {g['goal']:<56}{shown:>12}  target {g['target']:<8} {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="coordinator-bench-", dir=args.workdir))
    started = time.monotonic()
    try:
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            log(f"profiling a drain of {args.large} tasks into {args.profile}")
            result = fleet.intake_and_drain(work / "profile", args.large, agents=args.agents,
                                            concurrency=args.concurrency,
                                            profile=args.profile,
                                            profile_flags=tuple(args.profile_flags.split()))
            print(json.dumps(result, indent=2, default=str))
            return 0
        report = run(args, work)
        report["elapsed_seconds"] = time.monotonic() - started
        print(table(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
            log(f"wrote {args.json}")
        return 0 if all(g["met"] is not False for g in report["goals"]
                        if g["goal"].startswith("6.")) else 1
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            remove(work)


if __name__ == "__main__":
    sys.exit(main())
