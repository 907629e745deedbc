"""Long-running commands: run (the daemon), agent (one agent process), demo."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from coordinator.agent.process import Agent
from coordinator.cli.app import Context, cli, configure_logging, handle_errors
from coordinator.daemon.main import Daemon
from coordinator.specs import load_spec
from coordinator.views import fleet_status

pass_ctx = click.make_pass_decorator(Context)


@cli.command()
@click.option("--exit-when-idle", is_flag=True,
              help="Stop once nothing is queued, running or waiting in tasks.d.")
@pass_ctx
@handle_errors
def run(ctx: Context, exit_when_idle: bool) -> None:
    """Run the daemon in the foreground (for systemd: Type=notify).

    Watches tasks.d/, queues valid tasks, rejects bad ones with a reason, keeps each agent
    spec's processes running, reclaims the claims of dead or stalled agents. SIGTERM stops it
    gracefully (agents finish within shutdown_grace or give their tasks back); exits 0.
    """
    configure_logging(ctx)
    sys.exit(asyncio.run(Daemon(ctx.settings, exit_when_idle=exit_when_idle).run()))


@cli.command()
@click.option("--spec", "spec_path", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The agent spec (agents/<kind>.toml).")
@click.option("--agent-id", help="Agent id (default: <spec>.<random>).")
@click.option("--supervisor-pid", type=int, hidden=True, help="Set by the daemon.")
@click.option("--settings-file", type=click.Path(dir_okay=False, path_type=Path), hidden=True,
              help="Settings written by the daemon (set by the daemon).")
@click.option("--reap/--no-reap", default=None,
              help="Also reclaim dead agents' claims (default: when not started by a daemon).")
@click.option("--exit-when-idle", is_flag=True, help="Stop when nothing is left to claim.")
@pass_ctx
@handle_errors
def agent(
    ctx: Context,
    spec_path: Path,
    agent_id: str | None,
    supervisor_pid: int | None,
    settings_file: Path | None,
    reap: bool | None,
    exit_when_idle: bool,
) -> None:
    """Run one agent process from a spec.

    The daemon starts these itself; run one by hand (or with coordinator-agent@.service) for a
    spec with processes = 0. It must run on the spool's host: the file spool's claims are local
    flocks and renames (a Redis spool for several hosts is planned).
    """
    if settings_file is not None:
        ctx.use_settings_file(settings_file)
    configure_logging(ctx)
    spec = load_spec(spec_path)
    runner = Agent(ctx.settings, spec, agent_id=agent_id, supervisor_pid=supervisor_pid,
                   reap=reap, exit_when_idle=exit_when_idle)
    sys.exit(asyncio.run(runner.run()))


DEMO_SPEC = """\
# The demo's fleet: three echo agents, two tasks at a time each; no keys needed.
backend = "echo"
processes = 3
concurrency = 2
system_prompt = "You are a demo agent."

[backend_options]
token_delay_ms = {delay}
prefix = "echo: "
"""


def _demo_tasks(home: Path, examples: Path | None, extra: int) -> int:
    tasks = home / "tasks.d"
    tasks.mkdir(parents=True)
    count = 0
    if examples is not None and examples.is_dir():
        for path in sorted(examples.iterdir()):
            if path.is_file() and path.suffix in (".toml", ".json", ".md") and \
                    not path.name.startswith(("README", ".")):
                shutil.copyfile(path, tasks / path.name)
                count += 1
    for i in range(extra):
        (tasks / f"demo-{i:03d}.toml").write_text(
            f'prompt = "Summarise item {i} of the demo batch in one line."\n'
            f"priority = {(i * 37) % 5 * 10}\n"
        )
        count += 1
    (tasks / "broken-example.toml").write_text('prompt = "unterminated\n')
    return count


@cli.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Run in this (new or empty) directory and keep it (default: a temporary one).")
@click.option("--examples", type=click.Path(file_okay=False, path_type=Path),
              default=Path("tasks.d"), show_default=True,
              help="Example tasks to copy in (skipped if missing).")
@click.option("--extra", type=int, default=24, show_default=True,
              help="Generated tasks added to the examples.")
@click.option("--token-delay-ms", type=float, default=15.0, show_default=True)
@handle_errors
def demo(directory: Path | None, examples: Path, extra: int, token_delay_ms: float) -> None:
    """A self-contained run on the echo backend (no API keys): a fleet of three agents drains
    a copy of the example tasks plus generated ones; progress is shown live, then a summary."""
    keep = directory is not None
    home = directory or Path(tempfile.mkdtemp(prefix="coordinator-demo-"))
    home.mkdir(parents=True, exist_ok=True)
    if any(home.iterdir()):
        raise click.UsageError(f"{home} is not empty; give a new directory to --dir")
    (home / "agents").mkdir()
    (home / "agents" / "echo.toml").write_text(DEMO_SPEC.format(delay=token_delay_ms))
    total = _demo_tasks(home, examples, extra)
    click.echo(f"demo home: {home} ({total} tasks, plus 1 deliberately broken file)")
    log_path = home / "daemon.log"
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator", "--home", str(home), "run", "--exit-when-idle"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )
        from coordinator.config import load_settings

        settings = load_settings(home, environ={})
        last = ""
        while proc.poll() is None:
            report = fleet_status(settings)
            c = report["counts"]
            running = ", ".join(f"{r['task_id']}@{r['agent_id']}" for r in report["running"][:3])
            line = (f"[{time.monotonic() - started:5.1f}s] queued {c['queued']:>3}  running "
                    f"{c['claimed']:>2}  done {c['done']:>3}  failed {c['failed']}  rejected "
                    f"{c['rejected']}" + (f"  ({running}{', ...' if c['claimed'] > 3 else ''})"
                                          if running else ""))
            if line.split("]", 1)[1] != last:
                click.echo(line)
                last = line.split("]", 1)[1]
            time.sleep(0.25)  # a progress display for a person, not synchronisation
    elapsed = time.monotonic() - started
    report = fleet_status(settings)
    c = report["counts"]
    click.echo("")
    click.echo(f"summary: done {c['done']}, failed {c['failed']}, rejected {c['rejected']}, "
               f"cancelled {c['cancelled']} in {elapsed:.1f}s "
               f"(daemon exit status {proc.returncode})")
    for reason_file in sorted((home / "spool" / "rejected").glob("*.reason")):
        click.echo(f"rejected: {reason_file.read_text().strip()}")
    click.echo(f"try: coordinator --home {home} show demo-000")
    if not keep:
        click.echo(f"(the demo directory {home} is kept for you to look at; delete it when done)")
    ok = proc.returncode == 0 and c["done"] == total and c["failed"] == 0 and c["rejected"] == 1
    sys.exit(0 if ok else 1)
