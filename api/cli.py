"""The ``oos`` command. It works on the database directly, so it works while the daemon is down.

Tables for people by default, ``--json`` for scripts; an error is one line on stderr and a
non-zero exit (1 for a refused operation, 2 for a usage error).
"""
from __future__ import annotations

import datetime
import json
import sys
import time

import click

from api import reports
from api.auth import load_or_create_token
from helpers import backup as backups
from helpers import breaker as breakers
from helpers import queue_manager as queues
from helpers.config import load_config
from helpers.queue_manager import get_database, validate_queue_name
from helpers.tasks import handler_for


class Context:
    def __init__(self, as_json: bool):
        self.as_json = as_json
        self._config = None

    @property
    def config(self):
        if self._config is None:
            self._config = load_config()
        return self._config

    @property
    def db(self):
        return get_database(self.config)

    def queue(self, name: str):
        validate_queue_name(name)
        return reports.queue(self.db, self.config, name)

    def show(self, data, table=None) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2, default=str))
        elif table is not None:
            table()
        else:
            click.echo(json.dumps(data, indent=2, default=str))


def when(ts) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


class OosGroup(click.Group):
    """Turns the errors a caller can act on into one line on stderr."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ValueError, LookupError, OSError) as e:  # OSError: e.g. a data dir we may not read
            click.echo(f"oos: {e}", err=True)
            sys.exit(1)
        except Exception as e:
            if isinstance(e, (click.ClickException, click.exceptions.Exit, click.Abort)):
                raise
            click.echo(f"oos: {type(e).__name__}: {e}", err=True)
            sys.exit(1)


@click.group(cls=OosGroup)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
def cli(ctx, as_json):
    """OOS: a durable task queue and worker daemon."""
    ctx.obj = Context(as_json)


pass_ctx = click.make_pass_decorator(Context)


@cli.command()
def run():
    """Run the daemon in the foreground (what systemd runs)."""
    import oos_service_manager

    sys.exit(oos_service_manager.main())


@cli.command()
@pass_ctx
def status(c: Context):
    """Queues and the daemon at a glance."""
    queues = reports.all_queues(c.db, c.config)
    daemon = reports.daemon_status(c.db)

    def table():
        state = f"running (pid {daemon['pid']}, {daemon['workers_actual']} workers)" if daemon["running"] else "not running"
        click.echo(f"daemon: {state}")
        print_table(["queue", "ready", "delayed", "running", "succeeded", "dead", "paused", "breaker", "oldest"],
                    [[q["queue"], q["ready"], q["delayed"], q["counts"]["running"], q["counts"]["succeeded"],
                      q["counts"]["dead"], "yes" if q["paused"] else "no", q["breaker"]["state"],
                      f"{q['oldest_ready_age']:.1f}s"] for q in queues])

    c.show({"daemon": daemon, "queues": queues}, table)


@cli.command()
@click.argument("queue")
@click.argument("task")
@click.option("--payload", default="null", help="The payload, as JSON.")
@click.option("--priority", type=int, default=0)
@click.option("--delay", type=float, help="Seconds before it may run.")
@click.option("--max-attempts", type=int)
@click.option("--timeout", type=float, help="Lease and run-time limit, in seconds.")
@click.option("--key", "idempotency_key", help="Idempotency key.")
@pass_ctx
def enqueue(c: Context, queue, task, payload, priority, delay, max_attempts, timeout, idempotency_key):
    """Enqueue TASK on QUEUE; prints the task id."""
    try:
        data = json.loads(payload)
    except ValueError as e:
        raise ValueError(f"--payload: not valid JSON ({e})") from None
    options = {"max_attempts": max_attempts, "timeout": timeout}
    handler = handler_for(task)
    defaults = handler.defaults() if handler else {}
    options = {k: v if v is not None else defaults.get(k) for k, v in options.items()}
    task_id = c.queue(queue).enqueue(task, data, priority=priority, delay=delay,
                                     idempotency_key=idempotency_key, **options)
    c.show({"id": task_id}, lambda: click.echo(task_id))


def show_task(c: Context, task_id: int) -> None:
    task = queues.get_task(c.db, task_id)
    if task is None:
        raise LookupError(f"no task {task_id}")
    view = task.to_dict()

    def table():
        for key in ("id", "queue", "name", "state", "priority", "attempts", "max_attempts", "timeout", "worker",
                    "idempotency_key", "last_error"):
            click.echo(f"{key:16} {view[key] if view[key] is not None else '-'}")
        for key in ("created_at", "run_at", "started_at", "finished_at", "lease_until"):
            click.echo(f"{key:16} {when(view[key])}")
        click.echo(f"{'payload':16} {json.dumps(view['payload'])}")
        click.echo(f"{'result':16} {json.dumps(view['result'])}")
        for e in view["errors"]:
            click.echo(f"  attempt {e['attempt']} at {when(e['at'])}: {str(e['error']).splitlines()[0]}")

    c.show(view, table)


@cli.command("task")
@click.argument("task_id", type=int)
@pass_ctx
def task_cmd(c: Context, task_id):
    """Show one task: state, attempts, result, error history."""
    show_task(c, task_id)


@cli.command()
@click.argument("task_id", type=int)
@pass_ctx
def cancel(c: Context, task_id):
    """Cancel a queued task."""
    if not queues.cancel_task(c.db, task_id, time.time()):
        task = queues.get_task(c.db, task_id)
        raise LookupError(f"no task {task_id}" if task is None else
                          f"task {task_id} is {task.state}; only queued tasks can be cancelled")
    c.show({"id": task_id, "state": "cancelled"}, lambda: click.echo(f"cancelled {task_id}"))


@cli.group()
def dlq():
    """The dead-letter queue."""


@dlq.command("list")
@click.argument("queue")
@click.option("--limit", type=click.IntRange(1, 1000), default=50)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option("--task", "task_name", help="Only tasks with this name.")
@pass_ctx
def dlq_list(c: Context, queue, limit, offset, task_name):
    """Dead tasks of QUEUE, newest first."""
    q = c.queue(queue)
    items = [t.to_dict() for t in q.dead_letters(limit, offset, task_name)]
    total = q.count_dead(task_name)
    c.show({"items": items, "total": total, "limit": limit, "offset": offset},
           lambda: (print_table(["id", "task", "attempts", "died", "last error"],
                                [[t["id"], t["name"], t["attempts"], when(t["finished_at"]),
                                  (t["last_error"] or "").splitlines()[0][:60]] for t in items]),
                    click.echo(f"{len(items)} of {total} dead tasks")))


@dlq.command("show")
@click.argument("task_id", type=int)
@pass_ctx
def dlq_show(c: Context, task_id):
    """One dead task with its error history."""
    show_task(c, task_id)


@dlq.command("retry")
@click.argument("queue")
@click.argument("task_id", type=int, required=False)
@click.option("--all", "everything", is_flag=True, help="Retry every dead task of QUEUE.")
@click.option("--task", "task_name", help="With --all: only tasks with this name.")
@pass_ctx
def dlq_retry(c: Context, queue, task_id, everything, task_name):
    """Replay one dead task (TASK_ID) or all of them (--all) with fresh attempts."""
    if (task_id is None) == (not everything):
        raise click.UsageError("give a TASK_ID or --all")
    count = c.queue(queue).retry_dead(task_id=task_id, task_name=task_name)
    if task_id is not None and count == 0:
        raise LookupError(f"no dead task {task_id} in queue {queue!r}")
    c.show({"count": count}, lambda: click.echo(f"requeued {count}"))


@dlq.command("purge")
@click.argument("queue")
@click.argument("task_id", type=int, required=False)
@click.option("--all", "everything", is_flag=True, help="Purge every dead task of QUEUE.")
@click.option("--older-than", type=click.FloatRange(0), default=0.0, help="Only tasks dead this many seconds.")
@pass_ctx
def dlq_purge(c: Context, queue, task_id, everything, older_than):
    """Delete one dead task (TASK_ID) or all of them (--all)."""
    if (task_id is None) == (not everything):
        raise click.UsageError("give a TASK_ID or --all")
    count = c.queue(queue).purge_dead(task_id=task_id, older_than=older_than)
    c.show({"count": count}, lambda: click.echo(f"purged {count}"))


@cli.group()
def breaker():
    """Per-queue circuit breakers."""


@breaker.command("show")
@click.argument("queue", required=False)
@pass_ctx
def breaker_show(c: Context, queue):
    """The breaker of QUEUE, or of every queue."""
    rows = [breakers.status(c.db, validate_queue_name(queue))] if queue else breakers.all_status(c.db)
    c.show(rows if not queue else rows[0],
           lambda: print_table(["queue", "state", "failures", "opened"],
                               [[b["queue"], b["state"], b["fail_counter"], when(b["opened_at"])] for b in rows]))


@breaker.command("reset")
@click.argument("queue")
@pass_ctx
def breaker_reset(c: Context, queue):
    """Close QUEUE's breaker and clear its failure count."""
    breakers.reset(c.db, validate_queue_name(queue))
    c.show(breakers.status(c.db, queue), lambda: click.echo(f"breaker of {queue} closed"))


def set_paused(c: Context, queue: str, paused: bool) -> None:
    q = c.queue(queue)
    q.pause() if paused else q.resume()
    c.show({"queue": queue, "paused": paused}, lambda: click.echo(f"{queue} {'paused' if paused else 'resumed'}"))


@cli.command()
@click.argument("queue")
@pass_ctx
def pause(c: Context, queue):
    """Stop handing out QUEUE's tasks (running ones finish)."""
    set_paused(c, queue, True)


@cli.command()
@click.argument("queue")
@pass_ctx
def resume(c: Context, queue):
    """Hand out QUEUE's tasks again."""
    set_paused(c, queue, False)


@cli.command()
@pass_ctx
def workers(c: Context):
    """Desired and actual workers and the last scaling decision (from the daemon's last report)."""
    status = reports.daemon_status(c.db)

    def table():
        state = "running" if status["running"] else "not running"
        click.echo(f"daemon {state}; workers desired {status['workers_desired']}, actual {status['workers_actual']}")
        if status.get("last_scaling"):
            click.echo(f"last scaling decision: {status['last_scaling']['reason']}")
        print_table(["pid", "task", "rss_mb", "done", "draining"],
                    [[w["pid"], w["task_id"] or "-", w["rss_mb"], w["tasks_done"], "yes" if w["draining"] else "no"]
                     for w in status.get("workers", [])])

    c.show(status, table)


@cli.command()
@pass_ctx
def token(c: Context):
    """Print the API token (created on first use)."""
    value = load_or_create_token(c.config)
    c.show({"token": value}, lambda: click.echo(value))


@cli.group(invoke_without_command=True)
@pass_ctx
@click.pass_context
def backup(click_ctx, c: Context):
    """Make an online, verified backup now (what cron runs); `oos backup list` lists them."""
    if click_ctx.invoked_subcommand is not None:
        return
    made = backups.create_backup(c.db, c.config)
    c.show(made.to_dict(), lambda: click.echo(f"backup written: {made.path} ({made.size} bytes)"))


@backup.command("list")
@pass_ctx
def backup_list(c: Context):
    """Backups, newest first."""
    found = backups.list_backups(c.config)
    c.show([b.to_dict() for b in found],
           lambda: print_table(["name", "size", "created"], [[b.path.name, b.size, when(b.created_at)] for b in found]))


@cli.command()
@click.argument("backup_file", required=False, type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Restore even though the daemon seems to be running.")
@pass_ctx
def restore(c: Context, backup_file, force):
    """Replace the database with BACKUP_FILE (default: the newest backup). The current file is
    kept aside. Refuses while the daemon runs unless --force."""
    status = reports.daemon_status(c.db)
    if status["running"] and not force:
        raise ValueError(f"the daemon is running (pid {status['pid']}); stop it first or use --force")
    if backup_file is None:
        found = backups.list_backups(c.config)
        if not found:
            raise LookupError(f"no backups in {c.config.backups_path}")
        backup_file = found[0].path
    c.db.close()
    aside = backups.restore(c.config, backup_file)
    c.show({"restored": str(backup_file), "previous": str(aside)},
           lambda: click.echo(f"restored {backup_file}; the previous database is at {aside}"))


def main() -> None:
    cli(prog_name="oos")


if __name__ == "__main__":
    main()
