"""Commands that operate on tasks and report: submit, status, tasks, show, cancel, retry, db."""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import click

from coordinator.cli.app import Context, cli, emit_json, handle_errors
from coordinator.errors import CoordinatorError, ExitCode, StateConflict, TaskFileError
from coordinator.models import Task, TaskView, is_valid_name
from coordinator.spool.filespool import FileSpool
from coordinator.spool.fsutil import fsync_dir, write_file
from coordinator.spool.layout import SpoolLayout
from coordinator.states import TaskState
from coordinator.store import Store
from coordinator.store.rebuild import rebuild
from coordinator.taskfile import ID_RULE, parse_task, render_task
from coordinator.views import fleet_status, task_view

pass_ctx = click.make_pass_decorator(Context)


def _record(settings: Any, task_id: str, state: TaskState, reason: str | None = None) -> None:
    """Best effort: the spool already moved; the record follows (``db rebuild`` repairs it)."""
    try:
        with Store(settings.db_file) as store:
            store.record_state(task_id, state, reason)
            store.record_event(state.value, task_id=task_id, data={"by": "cli"})
    except CoordinatorError as exc:
        click.echo(f"coordinator: warning: not recorded in the database: {exc.message}", err=True)


def drop_task(tasks_dir: Path, filename: str, data: bytes) -> Path:
    """Atomically drop a task file: write a hidden temporary, fsync, rename, fsync the dir."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    final = tasks_dir / filename
    if final.exists():
        raise StateConflict(f"{final} already exists; wait for the daemon to take it or rename")
    tmp = tasks_dir / f".{filename}.{os.getpid()}.tmp"  # a dotfile: intake ignores it
    write_file(tmp, data, fsync=True)
    os.rename(tmp, final)
    fsync_dir(tasks_dir)
    return final


@cli.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--prompt", "-p", help="Submit this prompt ('-' reads it from stdin).")
@click.option("--id", "task_id", help="Task id (default: the file's stem, or generated).")
@click.option("--priority", type=int, help="Lower runs first (default 100).")
@click.option("--agent", help="Only agents of this spec may take it.")
@click.option("--max-attempts", type=int)
@click.option("--timeout", type=float, help="Seconds one attempt may take.")
@click.option("--session", help="Affinity key: tasks of a session prefer the same agent.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print {id, file} as JSON.")
@pass_ctx
@handle_errors
def submit(
    ctx: Context,
    file: Path | None,
    prompt: str | None,
    task_id: str | None,
    priority: int | None,
    agent: str | None,
    max_attempts: int | None,
    timeout: float | None,
    session: str | None,
    labels: tuple[str, ...],
    as_json: bool,
) -> None:
    """Validate a task and drop it atomically into tasks.d/ for the daemon.

    Either FILE (a .toml, .json or .md task file) or --prompt. Options override the file's keys.
    Exits 2 if the task is invalid (nothing is dropped), 4 if its id is taken.
    """
    settings = ctx.settings
    if (file is None) == (prompt is None):
        raise click.UsageError("give either FILE or --prompt")
    if task_id is not None and not is_valid_name(task_id):
        raise TaskFileError(f"--id {task_id!r} is not a valid task id: use {ID_RULE}")
    updates: dict[str, Any] = {
        k: v
        for k, v in {
            "id": task_id, "priority": priority, "agent": agent, "max_attempts": max_attempts,
            "timeout": timeout, "session": session,
        }.items()
        if v is not None
    }
    for label in labels:
        key, sep, value = label.partition("=")
        if not sep:
            raise click.UsageError(f"--label {label!r}: use KEY=VALUE")
        updates.setdefault("labels", {})[key] = value
    if file is not None:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise click.UsageError(f"cannot read {file}: {exc.strerror}") from exc
        task = parse_task(file.name, data, settings.max_prompt_chars)
        filename = file.name
    else:
        assert prompt is not None
        text = sys.stdin.read() if prompt == "-" else prompt
        generated = f"t-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
        task = parse_task(f"{task_id or generated}.json", render_task_raw({"prompt": text}),
                          settings.max_prompt_chars)
        filename = None
    if updates:
        merged = {**task.model_dump(exclude_defaults=True), **updates}
        if "labels" in updates:
            merged["labels"] = {**task.labels, **updates["labels"]}
        task = parse_task(f"{merged['id']}.json", render_task_raw(merged),
                          settings.max_prompt_chars)
        filename = None
    if FileSpool(SpoolLayout(settings.spool_path)).layout.envelope_path(task.id).exists():
        raise StateConflict(
            f"a task with id {task.id!r} already exists; choose another id or "
            f"'coordinator retry {task.id}'"
        )
    if filename is None:
        filename, data = f"{task.id}.json", render_task(task)
    path = drop_task(settings.tasks_path, filename, data)
    if as_json:
        emit_json({"id": task.id, "file": str(path)})
    else:
        click.echo(task.id)


def render_task_raw(raw: dict[str, Any]) -> bytes:
    import json

    return json.dumps(raw).encode("utf-8")


def _age(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
@pass_ctx
@handle_errors
def status(ctx: Context, as_json: bool) -> None:
    """Show the daemon, each agent, running tasks and counts by state.

    Verified against the live processes. Exits 3 when the daemon is not running.
    """
    report = fleet_status(ctx.settings)
    if as_json:
        emit_json(report)
    else:
        d = report["daemon"]
        click.echo(
            f"daemon: running (pid {d['pid']})" if d["running"] else "daemon: NOT running"
        )
        for spec, slots in report["slots"].items():
            states = ", ".join(f"{s['state']}" for s in slots)
            click.echo(f"spec {spec}: {len(slots)} process(es): {states}")
        for agent in report["agents"]:
            click.echo(
                f"  agent {agent['agent_id']:<24} pid {agent['pid'] or '-':<8} "
                f"{agent['state']:<8} heartbeat {_age(agent['heartbeat_age']):<7} "
                f"tasks: {', '.join(agent['tasks']) or '-'}"
            )
        counts = report["counts"]
        click.echo("tasks: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if report["orphaned_claims"]:
            click.echo(f"claims awaiting reclaim: {report['orphaned_claims']}")
        if report["pending_files"]:
            click.echo(f"files waiting in tasks.d: {report['pending_files']}")
    if not report["daemon"]["running"]:
        sys.exit(ExitCode.NOT_RUNNING)


@cli.command()
@click.option("--state", type=click.Choice([s.value for s in TaskState]), help="Only this state.")
# IntRange: the store refuses a limit below 1 with a ValueError (a traceback and exit 1 here).
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@pass_ctx
@handle_errors
def tasks(ctx: Context, state: str | None, limit: int, as_json: bool) -> None:
    """List tasks (claim order), optionally only those in one state.

    Queued and claimed come from the spool itself; ended tasks from the database record.
    """
    settings = ctx.settings
    layout = SpoolLayout(settings.spool_path)
    rows: list[dict[str, Any]] = []
    if state in (None, "claimed") and layout.claims.exists():
        rows += [{"id": c.task_id, "state": "claimed", "priority": c.queue.priority,
                  "attempt": c.attempt, "agent_id": c.agent_id} for c in layout.list_claims()]
    if state in (None, "queued") and layout.queue.exists():
        rows += [{"id": q.task_id, "state": "queued", "priority": q.priority,
                  "attempt": q.attempt} for q in layout.list_queue()[:limit]]
    if state not in ("queued", "claimed") and settings.db_file.exists():
        with Store(settings.db_file) as store:
            ended = [TaskState(state)] if state else [
                TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED, TaskState.REJECTED]
            for s in ended:
                if s is TaskState.REJECTED:
                    # Rejected files never became tasks: they have their own table.
                    rows += [{"id": r["task_id"] or r["name"], "state": "rejected",
                              "file": r["file"], "reason": r["reason"]}
                             for r in store.list_rejected(limit)]
                    continue
                for row in store.list_tasks(s, limit):
                    rows.append({"id": row["id"], "state": row["state"],
                                 "priority": row.get("priority"),
                                 "attempt": row.get("attempts"),
                                 "reason": row.get("reason")})
    rows = rows[:limit]
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        click.echo(f"{row['id']:<40} {row['state']:<10} prio {row.get('priority')!s:<6} "
                   f"attempt {row.get('attempt')!s}")


def _view_json(view: TaskView) -> dict[str, Any]:
    data = view.model_dump(mode="json")
    data["attempts"] = [
        {k: a[k] for k in ("number", "agent", "pid", "started_at", "ended_at", "outcome",
                           "reason")}
        for a in data["attempts"]
    ]
    return data


@cli.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the task as JSON.")
@click.option("--follow", "-f", is_flag=True, help="Stream a running task's output until it ends.")
@pass_ctx
@handle_errors
def show(ctx: Context, task_id: str, as_json: bool, follow: bool) -> None:
    """Show a task: state, attempts, and its output (or why it failed or was rejected)."""
    settings = ctx.settings
    if follow:
        _follow(settings, task_id)
    view = task_view(settings, task_id)
    if as_json:
        emit_json(_view_json(view))
        return
    if follow:
        return
    click.echo(f"task {view.id}: {view.state.value}")
    if view.priority is not None:
        click.echo(f"priority {view.priority}, agent {view.agent or 'any'}, from {view.source}")
    for a in view.attempts:
        click.echo(f"  attempt {a.number}: {a.outcome.value} on {a.agent} (pid {a.pid})"
                   + (f": {a.reason}" if a.reason else ""))
    if view.reason:
        click.echo(f"reason: {view.reason}")
    if view.output is not None:
        click.echo("output:")
        click.echo(view.output)


def _follow(settings: Any, task_id: str) -> None:
    spool = FileSpool(SpoolLayout(settings.spool_path))
    shown: dict[int, int] = {}
    while True:
        view = task_view(settings, task_id)
        if view.state is TaskState.CLAIMED or view.state.terminal:
            numbers = [a.number for a in view.attempts] or [0]
            n = max(numbers)
            text = spool.read_partial(task_id, n)
            done = shown.get(n, 0)
            if len(text) > done:
                click.echo(text[done:], nl=False)
                shown[n] = len(text)
        if view.state.terminal:
            # A fast attempt's output may never have gone through the partial file: print
            # whatever of the committed output has not been shown yet.
            if view.state is TaskState.DONE and view.output is not None:
                n = max([a.number for a in view.attempts] or [0])
                click.echo(view.output[shown.get(n, 0):] if shown.get(n) else view.output,
                           nl=False)
            click.echo()
            return
        time.sleep(0.1)  # polling a file for a person watching, not synchronisation


@cli.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def cancel(ctx: Context, task_id: str, as_json: bool) -> None:
    """Cancel a queued or running task (a running one is stopped, its children killed).

    Exits 4 if the task has already ended.
    """
    spool = FileSpool(SpoolLayout(ctx.settings.spool_path))
    loc = spool.cancel(task_id)
    _record(ctx.settings, task_id, loc.state, "cancelled by the operator")
    if as_json:
        emit_json({"id": task_id, "state": loc.state.value})
    else:
        click.echo(f"{task_id}: {loc.state.value}")


@cli.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def retry(ctx: Context, task_id: str, as_json: bool) -> None:
    """Queue an ended task (done, failed or cancelled) again, with a fresh attempt budget.

    Exits 4 if the task is still queued or running.
    """
    spool = FileSpool(SpoolLayout(ctx.settings.spool_path))
    loc = spool.retry(task_id)
    _record(ctx.settings, task_id, TaskState.QUEUED)
    if as_json:
        emit_json({"id": task_id, "state": loc.state.value, "attempt": loc.attempt})
    else:
        click.echo(f"{task_id}: queued as attempt {loc.attempt}")


@cli.group()
def db() -> None:
    """The state database (a record that can be rebuilt from the spool)."""


@db.command("rebuild")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
@handle_errors
def db_rebuild(ctx: Context, as_json: bool) -> None:
    """Rebuild the tasks, attempts and rejected records from the spool alone."""
    settings = ctx.settings
    spool = FileSpool(SpoolLayout(settings.spool_path).ensure())
    with Store(settings.db_file) as store:
        counts = rebuild(store, spool)
    if as_json:
        emit_json(counts)
    else:
        click.echo(", ".join(f"{k}: {v}" for k, v in counts.items()))


__all__ = ["Task", "TaskFileError", "drop_task", "render_task_raw"]
