"""The ``oos`` command. It works on the database directly, so it works while the daemon is down.

Tables for people by default, ``--json`` (before or after the command) for scripts. Times are
ISO 8601. An error is one line on stderr and a non-zero exit: 1 for a refused or failed
operation, 2 for a wrong command line (``helpers.exit_codes``). Only ``oos run`` creates a
database; every other command names the file it uses and refuses when there is none.
"""
from __future__ import annotations

import json
import os
import sys
import time

import click

import oos_service_manager
from api.identity import load_or_create_token
from helpers import backup as backups
from helpers import blockers, exit_codes, limits, periodic, reports, task_metrics, times
from helpers import breaker as breakers
from helpers import queue_manager as queues
from helpers import workflow as workflows
from helpers.config import load_config
from helpers.engine import (
    DATABASE_ERRORS,
    Unsupported,
    capabilities,
    describe,
    disk_full,
    get_database,
    require_local_file,
)
from helpers.process import DaemonRunning, hold_database
from helpers.registry import load_task_modules
from helpers.validation import CONCURRENCY_RANGE, MAX_PAGE, InvalidField, number, queue_name


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
        path = self.config.db_path
        if capabilities(self.config).local_file and not path.exists():  # a typo in OOS_DATA_DIR must not make a new, empty queue
            raise LookupError(f"no database at {path}: start the daemon (oos run) to create it, "
                              f"or point OOS_DATA_DIR at the directory it uses")
        return get_database(self.config)

    def load_handlers(self) -> None:
        """Import the daemon's task modules, as the daemon does (their @task defaults and
        @periodic schedules)."""
        load_task_modules(oos_service_manager.task_modules(self.config))

    def queue(self, name: str):
        return reports.queue(self.db, self.config, queue_name(name))

    def known_queue(self, name: str, create: bool = False) -> str:
        """``name`` if something uses that queue (queue_manager.known_queue), else LookupError."""
        self.load_handlers()
        return queues.known_queue(self.db, name, self.config, create)

    def show(self, data, table=None) -> None:
        if self.as_json or table is None:
            click.echo(json.dumps(data, indent=2, default=str))
        else:
            table()


when = times.local


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
        except BrokenPipeError:
            # The reader went away (`oos task 1 | head -1`): not an error of ours. Point stdout
            # at /dev/null so the interpreter's last flush does not complain either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(exit_codes.OK)
        except (ValueError, LookupError, OSError, DaemonRunning, Unsupported) as e:  # OSError: e.g. a data dir we may not read
            click.echo(f"oos: {e}", err=True)
            sys.exit(exit_codes.REFUSED)
        except DATABASE_ERRORS as e:
            if disk_full(e):  # every change, a purge's cancellations too, is a write that needs room
                click.echo(f"oos: the disk holding the database is full ({e}); nothing was changed. Free some space "
                           "(old backups: `oos backup list`; other files on that disk), then run this again", err=True)
            else:
                click.echo(f"oos: the database failed: {type(e).__name__}: {e}", err=True)
            sys.exit(exit_codes.REFUSED)
        except Exception as e:
            if isinstance(e, (click.ClickException, click.exceptions.Exit, click.Abort)):
                raise
            click.echo(f"oos: {type(e).__name__}: {e}", err=True)
            sys.exit(exit_codes.REFUSED)


def _set_json(ctx, param, value):
    if value:
        ctx.find_object(Context).as_json = True


json_option = click.option("--json", "as_json", is_flag=True, expose_value=False, is_eager=True,
                           callback=_set_json, help="Machine-readable JSON output.")


class OosCommandGroup(OosGroup):
    """Every subcommand also takes ``--json`` after its name (``oos status --json``)."""

    def command(self, *args, **kwargs):
        decorator = super().command(*args, **kwargs)
        return lambda f: decorator(json_option(f))

    def group(self, *args, **kwargs):
        kwargs.setdefault("cls", OosCommandGroup)
        return super().group(*args, **kwargs)


@click.group(cls=OosCommandGroup)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
def cli(ctx, as_json):
    """OOS: a durable task queue and worker daemon."""
    ctx.obj = Context(as_json)


pass_ctx = click.make_pass_decorator(Context)
# Control actions refuse a queue nothing uses (a typo would make a new queue): unless --create.
CREATE = click.option("--create", is_flag=True, help="Even if nothing uses QUEUE yet (no task, handler or schedule).")


@cli.command()
def run():
    """Run the daemon in the foreground (what systemd runs)."""
    sys.exit(oos_service_manager.main([]))  # its own command line is ours


@cli.command()
@pass_ctx
def status(c: Context):
    """Queues and the daemon at a glance."""
    queue_rows = reports.all_queues(c.db, c.config)
    daemon = reports.daemon_status(c.db, c.config)

    def table():
        click.echo(f"database: {describe(c.config)}")
        alive = [d for d in daemon["daemons"] if d["alive"]]
        state = (f"{len(alive)} running, {daemon['workers_actual']} workers" if daemon["running"] else "not running")
        click.echo(f"daemons: {state}")
        for d in daemon["daemons"]:
            health = "beating" if d["alive"] else (f"stopped answering, its tasks rescued {when(d['rescued_at'])}"
                                                   if d["rescued_at"] else "stopped")
            click.echo(f"  {d['host']} pid {d['pid']}: {health}; last beat {d['age']:.1f} s ago, started "
                       f"{when(d['started_at'])}, {d['workers']} workers, queues {', '.join(d['served_queues']) or '-'}")
        print_table(["queue", "ready", "delayed", "running", "succeeded", "dead", "paused", "breaker", "oldest",
                     "served"],
                    [[q["queue"], q["ready"], q["delayed"], q["counts"]["running"], q["counts"]["succeeded"],
                      q["counts"]["dead"], "yes" if q["paused"] else "no", q["breaker"]["state"],
                      f"{q['oldest_ready_age']:.1f}s" if q["ready"] else "-", SERVED[q["served"]]] for q in queue_rows])

    c.show({"database": describe(c.config), "daemon": daemon, "queues": queue_rows}, table)


SERVED = {None: "-", True: "yes", False: "no (no worker)"}


OPTION_HELP = {
    "priority": "Higher runs first (default 0).", "delay": "Seconds before it may run.",
    "run_at": "When it may run, as epoch seconds (instead of --delay).",
    "max_attempts": "Default: the handler's @task(max_attempts=), else the config's.",
    "timeout": "Lease and run-time limit, in seconds (default: the handler's).",
    "idempotency_key": "Idempotency key: an enqueue with a key already used stores nothing.",
    "unique_key": "No second task with this key while one is queued or running.",
    "unique_for": "Seconds the unique key holds at most (default 3600).",
}


def task_options(command):
    """An option for each keyword of ``QueueManager.enqueue`` (its type from the signature):
    a new task field is offered here without a line of its own."""
    for name, annotation in reversed(queues.ENQUEUE_OPTIONS.items()):
        kind = {"int": int, "float": float}.get(annotation.partition(" | ")[0], str)
        flags = [f"--{name.replace('_', '-')}"] + (["--key"] if name == "idempotency_key" else [])
        command = click.option(*flags, name, type=kind, help=OPTION_HELP.get(name))(command)
    return command


@cli.command()
@click.argument("queue")
@click.argument("task")
@click.option("--payload", default="null", help="The payload, as JSON.")
@task_options
@pass_ctx
def enqueue(c: Context, queue, task, payload, **options):
    """Enqueue TASK on QUEUE; prints the task id."""
    try:
        data = json.loads(payload)
    except ValueError as e:
        raise ValueError(f"--payload: not valid JSON ({e})") from None
    c.load_handlers()  # the handlers' defaults
    task_id = c.queue(queue).enqueue(task, data, **{k: v for k, v in options.items() if v is not None})
    c.show({"id": task_id}, lambda: click.echo(task_id))


def get_task(c: Context, task_id: int) -> queues.Task:
    task = queues.get_task(c.db, task_id)
    if task is None:
        raise LookupError(f"no task {task_id}")
    return task


def show_task(c: Context, task: queues.Task) -> None:
    view = task.to_dict()

    def table():
        for key in ("id", "queue", "name", "state", "priority", "attempts", "max_attempts", "failures", "timeout", "worker",
                    "idempotency_key", "unique_key", "workflow", "last_error"):
            click.echo(f"{key:16} {view[key] if view[key] is not None else '-'}")
        if view["progress"] is not None:
            click.echo(f"{'progress':16} {view['progress']:.0%} {view['progress_message'] or ''}".rstrip())
        if view["cancel_requested"]:
            click.echo(f"{'cancel asked':16} {when(view['cancel_requested'])}")
        for key in ("created_at", "run_at", "started_at", "finished_at", "lease_until"):
            click.echo(f"{key:16} {when(view[key])}")
        click.echo(f"{'payload':16} {json.dumps(view['payload'])}")
        click.echo(f"{'result':16} {json.dumps(view['result'])}")
        for e in view["errors"]:
            click.echo(f"  replayed at {when(e['at'])}: fresh attempts from here" if e.get("replayed") else
                       f"  attempt {e['attempt']} at {when(e['at'])}: {str(e['error']).splitlines()[0]}")

    c.show(view, table)


@cli.command("task")
@click.argument("task_id", type=int)
@click.option("--wait", type=click.FloatRange(0), help="Wait up to this many seconds for it to finish; "
                                                      "exit 1 if it did not succeed.")
@pass_ctx
def task_cmd(c: Context, task_id, wait):
    """Show one task: state, attempts, progress, result, error history."""
    if wait is None:
        return show_task(c, get_task(c, task_id))
    try:
        task = queues.wait(c.db, task_id, wait)
    except TimeoutError:
        task = get_task(c, task_id)
    show_task(c, task)
    if task.state != "succeeded":
        sys.exit(exit_codes.REFUSED)


@cli.command()
@click.option("--queue")
@click.option("--state", type=click.Choice(queues.STATES))
@click.option("--task", "name", help="Only tasks with this name.")
@click.option("--since", type=click.DateTime(), help="Created at or after (local time).")
@click.option("--until", type=click.DateTime(), help="Created before (local time).")
@click.option("--text", help="The payload contains this text.")
@click.option("--before", type=click.IntRange(1), help="The cursor printed after the previous page.")
@click.option("--limit", type=click.IntRange(1, MAX_PAGE), default=20)
@pass_ctx
def tasks(c: Context, queue, state, name, since, until, text, before, limit):
    """Browse tasks, newest first, by queue, state, name, time and payload text."""
    items, cursor = queues.browse(c.db, queue=queue, state=state, name=name, text=text, before=before, limit=limit,
                                  since=since.timestamp() if since else None, until=until.timestamp() if until else None)

    def table():
        print_table(["id", "queue", "task", "state", "attempts", "created", "progress"],
                    [[t.id, t.queue, t.name, t.state, t.attempts, when(t.created_at),
                      "-" if t.progress is None else f"{t.progress:.0%}"] for t in items])
        if cursor:
            click.echo(f"more: --before {cursor}")

    c.show({"items": [t.to_dict() for t in items], "next": cursor}, table)


@cli.command()
@click.argument("task_id", type=int)
@pass_ctx
def why(c: Context, task_id):
    """Why isn't task TASK_ID running? Every reason that holds it back."""
    found = blockers.why(c.db, c.config, task_id)
    if found is None:
        raise LookupError(f"no task {task_id}")

    def table():
        click.echo(f"task {task_id} is {found['state']}")
        for b in found["blockers"]:
            click.echo(f"  {b['reason']}: {b['detail']}")
        if found["state"] == "queued" and not found["blockers"]:
            click.echo("  nothing holds it back: it is next")

    c.show(found, table)


@cli.command()
@click.argument("task_id", type=int)
@pass_ctx
def cancel(c: Context, task_id):
    """Cancel a task: at once if it has not started; a running one is stopped by its worker."""
    outcome = queues.cancel_task(c.db, task_id, time.time())
    if outcome is None:
        raise ValueError(f"task {task_id} is {get_task(c, task_id).state}; only unfinished tasks can be cancelled")
    c.show({"id": task_id, "outcome": outcome},
           lambda: click.echo(f"cancelled {task_id}" if outcome == "cancelled" else
                              f"cancelling {task_id}: its worker stops it"))


@cli.command("run-now")
@click.argument("task_id", type=int)
@pass_ctx
def run_now(c: Context, task_id):
    """Run a task now that waits for its delay or its retry's backoff."""
    if not queues.run_now(c.db, task_id):
        raise ValueError(f"task {task_id} is {get_task(c, task_id).state} and not waiting for a delay or a backoff")
    c.show({"id": task_id, "outcome": "due now"}, lambda: click.echo(f"task {task_id} is due now"))


@cli.command()
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def purge(c: Context, queue, yes):
    """Cancel every task of QUEUE that has not started (running ones finish)."""
    c.known_queue(queue)
    waiting = c.queue(queue).stats()["counts"]
    count = waiting["queued"] + waiting["waiting"] + waiting["blocked"]
    if not yes:
        click.confirm(f"cancel the {count} tasks of {queue} that have not started?", abort=True, err=True)
    purged = queues.purge_queue(c.db, queue)
    c.show({"queue": queue, "cancelled": purged}, lambda: click.echo(f"cancelled {purged} tasks of {queue}"))


@cli.command()
@pass_ctx
def schedule(c: Context):
    """The periodic tasks and their next runs (a * marks one this process's task modules do
    not declare: registered by a daemon that loads other modules)."""
    c.load_handlers()  # @periodic schedules live in the task modules
    rows = periodic.listing(c.db, periodic.configured(c.config))
    c.show(rows, lambda: print_table(
        ["name", "task", "queue", "schedule", "missed", "next run", "last task"],
        [[r["name"] + ("" if r["declared"] else " *"), r["task"], r["queue"], r["schedule"], r["missed"],
          when(r["next_runs"][0] if r["next_runs"] else None), r["last_task"] or "-"] for r in rows]))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


@cli.command()
@click.option("--hours", type=float, default=1.0, show_default=True, help="The window, up to 168 (a week).")
@pass_ctx
def metrics(c: Context, hours):
    """Per task name over the last HOURS: runs, failures, run time (mean, p50, p95, p99) and
    queue wait (from due to start: mean, p50, p95)."""
    number("hours", hours, minimum=0.01, maximum=168)
    rows = task_metrics.summary(c.db, time.time() - hours * 3600)
    c.show(rows, lambda: print_table(
        ["task", "queue", "runs", "failed", "run mean", "p50", "p95", "p99", "wait mean", "p50", "p95"],
        [[r["task"], r["queue"], r["runs"], r["failures"], *(duration(r[k]) for k in (
            "run_mean", "run_p50", "run_p95", "run_p99", "wait_mean", "wait_p50", "wait_p95"))] for r in rows]))


@cli.group()
def workflow():
    """Workflows: submit FILE (JSON steps, as the API takes), show ID."""


@workflow.command("submit")
@click.argument("file", type=click.File())
@pass_ctx
def workflow_submit(c: Context, file):
    """Store the workflow in FILE (- for stdin): {"steps": [{"task": ..., "after": [0]}, ...]}."""
    try:
        body = json.load(file)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file.name}: not JSON: {e}") from None
    steps = body.get("steps") if isinstance(body, dict) else body
    made = workflows.submit(c.db, steps, c.config)
    c.show(made, lambda: click.echo(f"workflow {made['workflow']}: tasks {', '.join(map(str, made['ids']))}"))


@workflow.command("show")
@click.argument("workflow_id", type=int)
@pass_ctx
def workflow_show(c: Context, workflow_id):
    """A workflow's steps (by any of its tasks' ids): state and what each runs after."""
    found = workflows.status(c.db, workflow_id)
    if found is None:
        raise LookupError(f"no workflow {workflow_id}")

    def table():
        click.echo(f"workflow {found['workflow']} is {found['state']}")
        print_table(["id", "task", "queue", "state", "after"],
                    [[s["id"], s["name"], s["queue"], s["state"], ",".join(map(str, s["after"])) or "-"]
                     for s in found["steps"]])

    c.show(found, table)


@cli.command()
@click.argument("queue")
@click.option("--concurrency", help="Running tasks of QUEUE at once, every worker and host together; 'none' lifts it.")
@CREATE
@pass_ctx
def limit(c: Context, queue, concurrency, create):
    """Show or set QUEUE's concurrency limit."""
    if concurrency is not None:
        value = None if concurrency.lower() == "none" else _integer("concurrency", concurrency)
        if value is not None:  # a bad value is named first, whatever the queue
            number("concurrency", value, minimum=CONCURRENCY_RANGE[0], maximum=CONCURRENCY_RANGE[1], integer=True)
        limits.set_concurrency(c.db, c.known_queue(queue, create), value)
    now = limits.concurrency(c.db, queue)
    c.show({"queue": queue, "concurrency": now},
           lambda: click.echo(f"{queue}: concurrency {now if now is not None else 'unlimited'}"))


@cli.command("rate-limit")
@click.argument("task", required=False)
@click.argument("rate", required=False)
@pass_ctx
def rate_limit(c: Context, task, rate):
    """List rate limits, or set TASK's to RATE (10/s, 100/min, 5/h; 'none' lifts it)."""
    if task and rate:
        limits.set_rate_limit(c.db, task, None if rate.lower() == "none" else rate)
    found = limits.rate_limits(c.db)
    c.show(found, lambda: print_table(["task", "rate"], sorted(found.items())))


def _integer(field: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidField(field, f"expected an integer or 'none', got {text!r}") from None


@cli.group()
def dlq():
    """The dead-letter queue: list [QUEUE], show ID, retry ID|--all, purge ID|--all."""


def dead_task(c: Context, task_id: int) -> queues.Task:
    task = get_task(c, task_id)
    if task.state != "dead":
        raise ValueError(f"task {task_id} is {task.state}, not dead")
    return task


def one_or_all(task_id, everything) -> None:
    if (task_id is None) == (not everything):
        raise click.UsageError("give a TASK_ID or --all")


@dlq.command("list")
@click.argument("queue", required=False)
@click.option("--limit", type=click.IntRange(1, MAX_PAGE), default=50)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option("--task", "task_name", help="Only tasks with this name.")
@pass_ctx
def dlq_list(c: Context, queue, limit, offset, task_name):
    """Dead tasks of QUEUE (default: every queue), newest first."""
    queue = queue_name(queue) if queue is not None else None
    items = [t.to_dict() for t in queues.dead_letters(c.db, queue, limit, offset, task_name)]
    total = queues.count_dead(c.db, queue, task_name)
    c.show({"items": items, "total": total, "limit": limit, "offset": offset},
           lambda: (print_table(["id", "queue", "task", "attempts", "died", "last error"],
                                [[t["id"], t["queue"], t["name"], t["attempts"], when(t["finished_at"]),
                                  (t["last_error"] or "").splitlines()[0][:60]] for t in items]),
                    click.echo(f"{len(items)} of {total} dead tasks")))


@dlq.command("show")
@click.argument("task_id", type=int)
@pass_ctx
def dlq_show(c: Context, task_id):
    """One dead task with its error history."""
    show_task(c, dead_task(c, task_id))


@dlq.command("retry")
@click.argument("task_id", type=int, required=False)
@click.option("--all", "everything", is_flag=True, help="Retry every dead task (of --queue, named --task).")
@click.option("--queue", help="With --all: only this queue.")
@click.option("--task", "task_name", help="With --all: only tasks with this name.")
@pass_ctx
def dlq_retry(c: Context, task_id, everything, queue, task_name):
    """Replay one dead task (TASK_ID) or many (--all) with fresh attempts."""
    one_or_all(task_id, everything)
    if task_id is not None:
        dead_task(c, task_id)
    queue = queue_name(queue) if queue else None
    count = queues.retry_dead(c.db, queue, task_id, task_name, time.time())
    c.show({"count": count}, lambda: click.echo(f"requeued {count}"))


@dlq.command("purge")
@click.argument("task_id", type=int, required=False)
@click.option("--all", "everything", is_flag=True, help="Purge every dead task (of --queue, named --task).")
@click.option("--queue", help="With --all: only this queue.")
@click.option("--task", "task_name", help="With --all: only tasks with this name.")
@click.option("--older-than", type=click.FloatRange(0), default=0.0, help="Only tasks dead this many seconds.")
@pass_ctx
def dlq_purge(c: Context, task_id, everything, queue, task_name, older_than):
    """Delete one dead task (TASK_ID) or many (--all)."""
    one_or_all(task_id, everything)
    if task_id is not None:
        dead_task(c, task_id)
    queue = queue_name(queue) if queue else None
    count = queues.purge_dead(c.db, queue, task_id, task_name, older_than, time.time())
    c.show({"count": count}, lambda: click.echo(f"purged {count}"))


@cli.group()
def breaker():
    """Per-queue circuit breakers."""


@breaker.command("show")
@click.argument("queue", required=False)
@pass_ctx
def breaker_show(c: Context, queue):
    """The breaker of QUEUE, or of every queue."""
    rows = [breakers.status(c.db, c.known_queue(queue))] if queue else breakers.all_status(c.db)
    c.show(rows if not queue else rows[0],
           lambda: print_table(["queue", "state", "failures", "opened"],
                               [[b["queue"], b["state"], b["fail_counter"], when(b["opened_at"])] for b in rows]))


@breaker.command("reset")
@click.argument("queue")
@pass_ctx
def breaker_reset(c: Context, queue):
    """Close QUEUE's breaker and clear its failure count."""
    breakers.reset(c.db, c.known_queue(queue))
    c.show(breakers.status(c.db, queue), lambda: click.echo(f"breaker of {queue} closed"))


def set_paused(c: Context, queue: str, paused: bool, create: bool) -> None:
    q = c.queue(c.known_queue(queue, create))
    q.pause() if paused else q.resume()
    c.show({"queue": queue, "paused": paused}, lambda: click.echo(f"{queue} {'paused' if paused else 'resumed'}"))


def pausing(name: str, paused: bool, help_text: str) -> None:
    """``oos pause`` and ``oos resume``: one command each, the same but for ``paused``."""
    @cli.command(name, help=help_text)
    @click.argument("queue")
    @CREATE
    @pass_ctx
    def command(c: Context, queue, create):
        set_paused(c, queue, paused, create)


pausing("pause", True, "Stop handing out QUEUE's tasks (running ones finish).")
pausing("resume", False, "Hand out QUEUE's tasks again.")


@cli.command()
@pass_ctx
def workers(c: Context):
    """Desired and actual workers and the last scaling decision (from the daemon's last report)."""
    status = reports.daemon_status(c.db, c.config)

    def table():
        state = "running" if status["running"] else "not running"
        click.echo(f"daemon {state}; workers desired {status['workers_desired']}, actual {status['workers_actual']}")
        if status.get("last_scaling"):
            decision = status["last_scaling"]
            click.echo(f"last scaling decision ({when(decision['at'])}): {decision['reason']}")
        print_table(["daemon", "pid", "task", "rss_mb", "done", "idle since", "draining"],
                    [[w["daemon"], w["pid"], w["task_id"] or "-", w["rss_mb"], w["tasks_done"], when(w.get("idle_since")),
                      "yes" if w["draining"] else "no"] for w in status.get("workers", [])])

    c.show(status, table)


@cli.command()
@click.option("--read-only", is_flag=True, help="The dashboard's read-only token instead.")
@pass_ctx
def token(c: Context, read_only):
    """Print the API token (created on first use); it also logs in to the dashboard."""
    c.db  # noqa: B018 - refuses when there is no database here (a wrong OOS_DATA_DIR)
    value = load_or_create_token(c.config, read_only)
    c.show({"token": value}, lambda: click.echo(value))


@cli.group(invoke_without_command=True)
@pass_ctx
@click.pass_context
def backup(click_ctx, c: Context):
    """Make an online, verified backup now (what cron runs); `oos backup list` lists them."""
    require_local_file(c.config, "oos backup")
    if click_ctx.invoked_subcommand is not None:
        return
    made = backups.create_backup(c.db, c.config)
    c.show(made.to_dict(), lambda: click.echo(f"backup written: {made.path} ({made.size} bytes)"))


@backup.command("list")
@pass_ctx
def backup_list(c: Context):
    """Backups, newest first: NAME is what `oos restore NAME` takes."""
    found = backups.list_backups(c.config)
    c.show([b.to_dict() for b in found],
           lambda: print_table(["name", "size", "created"], [[b.path.name, b.size, when(b.created_at)] for b in found]))


@cli.command()
@click.argument("name", required=False)
@pass_ctx
def restore(c: Context, name):
    """Replace the database with the backup NAME (from `oos backup list`; default: the newest).
    The current file is kept aside. Refused while the daemon runs: stop it first."""
    require_local_file(c.config, "oos restore")
    backup_file = backups.find_backup(c.config, name)
    try:  # holding the daemon's lock: no daemon can start on the file while we swap it
        lock = hold_database(c.config, exclusive=True)
    except DaemonRunning as e:
        raise ValueError(f"{e}: stop it first (systemctl stop oos, or Ctrl-C on `oos run`), "
                         f"then restore") from None
    try:
        aside = backups.restore(c.config, backup_file)
    finally:
        lock.close()
    c.show({"restored": str(backup_file), "previous": str(aside)},
           lambda: click.echo(f"restored {backup_file}; the previous database is at {aside}"))


@cli.command()
@pass_ctx
def migrate(c: Context):
    """Create or upgrade the database's schema (the daemon does this at start too). Safe to
    run while daemons run, and from several hosts at once."""
    from helpers import schema
    db = get_database(c.config)  # opening migrates; report what it found
    now = schema.version(db)
    c.show({"database": describe(c.config), "engine": db.engine, "version": now, "latest": schema.latest(db.engine)},
           lambda: click.echo(f"{describe(c.config)}: schema at version {now} ({db.engine}), the latest"))


def main() -> None:
    os.umask(0o077)  # backups and a first token: readable by this user only
    cli(prog_name="oos")


if __name__ == "__main__":
    main()
