"""The OOS daemon: the process systemd starts (``make run`` runs it in the foreground).

It keeps a target number of worker processes and reconciles to it every tick, serves the API
from a child process, requeues the tasks of workers that died, and tells systemd the truth:
READY=1 once workers and API are up, WATCHDOG=1 only from this loop and only while its checks
pass, STATUS= every tick, STOPPING=1 on the way out.

Signals only record themselves; the loop acts on them:
  SIGTERM/SIGINT  first: stop claiming, let running tasks finish up to workers_stop_timeout,
                  give back what is left, exit 0; second: stop at once.
  SIGHUP          reload the config, replace the workers gracefully.
  SIGTTIN/SIGTTOU one more / one fewer worker than the scaling policy says.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import multiprocessing.forkserver
import os
import secrets
import select
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil

from api.identity import load_or_create_token
from api.server import RET_BIND
from api.server import answers_as as api_answers_as
from api.server import main as api_main
from helpers import breaker as breakers
from helpers import daemon_status, exit_codes, limits, log, periodic, registry, worker_requests
from helpers.backup import recover_if_corrupt, signs_of_earlier_data, vacuum_if_fragmented
from helpers.config import Config, load_config
from helpers.config import reload as reload_config
from helpers.database_config import write_lock_holder
from helpers.engine import capabilities, describe, get_database, open_database
from helpers.housekeeping import Housekeeping
from helpers.jobs import Job, run_due
from helpers.process import DaemonRunning, hold_database, is_worker_alive, pid_of, worker_id
from helpers.queue_manager import fail_task, fail_worker_tasks, queue_names, release_worker_tasks
from helpers.queue_sql import statements
from helpers.registry import REGISTRY, TaskModuleError, handler_for, load_task_modules, registered_queues
from helpers.resource_manager import ResourceManager
from helpers.systemd import Notifier
from helpers.validation import InvalidField
from helpers.worker import Slots
from helpers.worker import main as worker_main
from lib import stream

# The tasks OOS itself runs (the assistant's replies and tools, the dead letter's bulk actions), loaded
# beside the configured modules.
APP_DIR = os.path.dirname(os.path.abspath(__file__))
# What the fork server imports before it forks anyone: the worker's and the API's modules and
# the built-in task modules, not the user's (a SIGHUP may change them: each worker imports
# those itself); helpers.preload last.
FORKSERVER_PRELOAD = ("helpers.worker", "api.server", "api.app", "lib.replies", "lib.tools", "lib.extraction",
                      "lib.browser", "helpers.bulk", "helpers.preload")
BUILTIN_TASK_MODULES = ("lib.replies", "lib.tools", "lib.extraction", "lib.browser", "helpers.bulk")

TICK = 0.2
LOOP_LOCK_WAIT = 0.5      # seconds a loop step may wait for the database's write lock
HUNG_GRACE = 10.0         # seconds past a task's deadline before its worker is killed
IDLE_HEARTBEAT_LIMIT = 60.0
CRASH_WINDOW, CRASH_LIMIT = 60.0, 5  # workers dead before their first heartbeat
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


def task_modules(config: Config) -> tuple[str, ...]:
    """Every task module the daemon, its workers, its API and the CLI load."""
    return (*BUILTIN_TASK_MODULES, *config.task_modules)


@dataclass
class Child:
    process: multiprocessing.Process
    slot: int
    started: float
    draining: bool = False
    drain_reason: str = ""
    kill_reason: str = ""  # why we killed it: its task's error


class ApiProcess:
    """The API server child: started at boot, restarted when it dies, READY waits for it.

    Each start gets a fresh nonce that the child sends back in a header, so an answer from
    some other server on the same port is never taken for ours."""

    def __init__(self, ctx, config: Config, logger):
        self.ctx, self.config, self.log = ctx, config, logger
        self.process = None
        self.nonce = ""
        self.answered = False
        self.restarts: list[float] = []
        self.next_start = 0.0

    def supervise(self) -> str | None:
        """Start or restart as needed; returns a reason to stop the daemon, if any."""
        if self.process is not None and self.process.is_alive():
            return None
        now = time.monotonic()
        where = f"{self.config.api_host}:{self.config.api_port}"
        if self.process is not None:
            self.process.join()
            code = self.process.exitcode
            if code == RET_BIND:
                taken = " (another server answers there)" if api_answers_as(self.config, None) else ""
                return f"the API cannot listen on {where}: the address is taken{taken}"
            self.log.warning("API process exited; restarting it", exit_code=code)
            self.restarts = [t for t in self.restarts if now - t < CRASH_WINDOW] + [now]
            if not self.answered and len(self.restarts) >= CRASH_LIMIT:
                return f"the API failed to start {CRASH_LIMIT} times on {where}"
            self.process, self.next_start = None, now + min(10.0, 0.5 * len(self.restarts))
        if now >= self.next_start:
            self.nonce, self.answered = secrets.token_hex(8), False
            self.process = self.ctx.Process(target=api_main, name="oos-api",
                                            args=(self.config, task_modules(self.config), self.nonce))
            self.process.start()
        return None

    def reload(self, config: Config) -> None:
        """The API reads its config again (SIGHUP; it keeps its address and database)."""
        self.config = config
        if self.process is not None and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGHUP)

    def ready(self) -> bool:
        if not self.answered and self.process is not None and self.process.is_alive():
            self.answered = api_answers_as(self.config, self.nonce, timeout=0.5)
        return self.answered

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()


@dataclass
class State:
    target: int = 0   # workers wanted now: base + bias
    base: int = 0     # what the scaling policy last decided
    bias: int = 0     # SIGTTIN / SIGTTOU
    decision: dict | None = None  # the last scaling decision as shown: target, reason, at
    ready_sent: bool = False
    stopping: bool = False
    crashes: list = field(default_factory=list)
    exit_code: int = exit_codes.OK
    reason: str = ""  # why the daemon stops, when it is not asked to


class ServiceManager:
    def __init__(self, config: Config, notifier: Notifier | None = None, schedules: list | None = None):
        self.config = config
        self.notifier = notifier or Notifier()
        self.log = log.get_logger()
        # Workers and the API are forked from a fork server that imported their modules once:
        # those pages are shared (an idle daemon's memory: 220 MB PSS with each child spawned
        # and importing its own; each further worker 14 MB), and each child is still a clean
        # process of its own (no thread, lock or connection of the manager's in it).
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
        # Python 3.11 gives the fork server no sys.path of ours: started from this directory,
        # it finds our packages first (from "/", under systemd, "lib" was /lib). Its children
        # still get the manager's path and working directory, as spawned ones did.
        with contextlib.chdir(APP_DIR):
            multiprocessing.forkserver.ensure_running()
        self.slots = Slots.create(self.ctx, 2 * config.workers_max + 2)
        self.workers: dict[int, Child] = {}  # by pid
        self.state = State(target=config.workers_min, base=config.workers_min)
        self.signals: list[int] = []
        self.scaler = ResourceManager(config)
        # The loop never waits long for the write lock: a worker frozen in a commit must not
        # freeze the loop that would kill it (nor the watchdog pings).
        self.db = open_database(config, max_lock_wait=LOOP_LOCK_WAIT)
        self.lock_holder: tuple[int | None, float] = (None, 0.0)  # pid, since when
        schedules = periodic.configured(config) if schedules is None else schedules
        self.housekeeping = Housekeeping(self.db, config, self.log, schedules=schedules)
        # lib's own rows, pruned by lib's own code on the housekeeping clock
        self.housekeeping.jobs.append(Job("reply events", 3600.0, self.prune_reply_events))
        self.api = ApiProcess(self.ctx, child_config(config), self.log) if config.api_enabled else None
        self.quiet_until: dict[str, float] = {}
        self.recycle_after = 0.0  # the memory-pressure recycling's cooldown, monotonic
        # The watchdog's pings, at twice the rate systemd asks for: a ping skipped while the
        # database refuses writes is made up within a quarter of WatchdogSec once it takes them.
        self.watchdog = ([Job("watchdog", self.notifier.watchdog_interval / 2, self.ping_watchdog)]
                         if self.notifier.watchdog_interval else [])
        # The loop: each turn (every TICK), every job whose time has come, in this order, on
        # the monotonic clock. Each survives its own errors (a full disk, a locked or broken
        # file): they are logged, and the job runs again at its next turn.
        self.jobs = [
            Job("reap", 0, self.reap),
            Job("api", 0, self.supervise_api),
            Job("probe", 1.0, self.probe_workers),  # psutil and /proc/locks
            Job("hung", 0, self.stop_hung_workers),
            Job("requests", 1.0, self.answer_requests),
            Job("housekeeping", 0, self.housekeeping.run_due),
            Job("database", 0, self.check_database),
            Job("scale", 1.0, self.scale),
            Job("reconcile", 0, self.reconcile),
            Job("ready", 0, self.send_ready),
            *self.watchdog,
            Job("status", 1.0, self.report_status),
            Job("metrics", config.log_metrics_interval, self.log_metrics,
                next_at=time.monotonic() + config.log_metrics_interval),
        ]
        self.started_at = time.time()

    def warn_if_tools_cannot_be_used(self) -> None:
        # Imported here: the manager keeps the assistant's libraries out of its memory.
        from lib.llm_providers import Local, providers_from_config
        providers = providers_from_config(self.config)
        if providers and all(isinstance(p, Local) for p in providers):
            self.log.warning("assistant.tools is set, but the only provider is the embedded model, which cannot call "
                             "tools: replies will not use them (give a remote provider's key)",
                             tools=list(self.config.assistant_tools))

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        self.install_signals()
        if self.config.assistant_tools:
            self.warn_if_tools_cannot_be_used()
        for s in self.housekeeping.schedules:
            if handler_for(s.task) is None:  # a typo in [schedules], or a module not loaded
                self.log.warning(f"schedule {s.name}: no loaded task module handles task {s.task!r}; its tasks "
                                 "will wait (or dead-letter in a queue this daemon serves)", schedule=s.name, task=s.task)
        self.log.info("starting", pid=os.getpid(), db=describe(self.config),
                      synchronous=self.config.database_synchronous, workers_min=self.config.workers_min,
                      workers_max=self.config.workers_max, queues=sorted(self.served_queues()) or "none")
        self.notifier.status("starting workers")
        self.guarded(self.recover_orphans)
        while not self.state.stopping:
            self.handle_signals()
            if self.state.stopping:
                break
            run_due(self.jobs, time.monotonic(), self.step_failed)
            self.sleep(TICK)
        return self.shutdown()

    def job(self, name: str) -> Job:
        return next(j for j in self.jobs if j.name == name)

    def step_failed(self, job: Job, e: Exception) -> None:
        now = time.monotonic()
        if now >= self.quiet_until.get(job.name, 0.0):  # once per 10 s a step, not 5 times a second
            self.quiet_until[job.name] = now + 10.0
            self.log.error("loop step failed; retrying", step=job.name, error=f"{type(e).__name__}: {e}")

    def guarded(self, step) -> None:
        """``step()`` outside the loop's jobs, its errors handled as theirs."""
        name = getattr(step, "__name__", None) or getattr(getattr(step, "func", None), "__name__", "step")
        run_due([Job(name, 0, step)], 0.0, self.step_failed)

    def supervise_api(self) -> None:
        if self.api is not None and (reason := self.api.supervise()):
            self.fail(exit_codes.API, reason)

    def check_database(self) -> None:
        if self.housekeeping.failure:
            self.fail(exit_codes.DATABASE, self.housekeeping.failure)

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.log.info("stop requested", signal=name)
                self.state.stopping = True
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum in (signal.SIGTTIN, signal.SIGTTOU):
                self.state.bias += 1 if signum == signal.SIGTTIN else -1
                self.log.info("worker target moved by one", signal=name, bias=self.state.bias)
                self.job("scale").next_at = 0.0  # decide now, so the reason shown says why

    def reap(self) -> None:
        """Collect exited workers; their tasks are failed attempts now, not at lease end (with
        the reason the worker was killed, when we killed it). A worker whose tasks cannot be
        recorded yet (the database refuses writes) is tried again at the next tick."""
        for pid, child in list(self.workers.items()):
            if child.process.is_alive():
                continue
            child.process.join()
            code = child.process.exitcode
            booted = bool(self.slots.get(child.slot)["beat"])
            reason = child.kill_reason or f"worker {worker_id(pid)} died (exit code {code})"
            lost = fail_worker_tasks(self.db, worker_id(pid), reason, jitter=self.config.queue_backoff_jitter)
            del self.workers[pid]
            self.slots.clear(child.slot)
            lifetime = time.monotonic() - child.started
            level = "info" if code == 0 else "warning"
            getattr(self.log, level)("worker exited", pid=pid, exit_code=code, lifetime=round(lifetime, 2),
                                     tasks_requeued=len(lost), draining=child.draining)
            if code == exit_codes.IMPORT:
                self.fail(exit_codes.IMPORT, "a worker could not boot; see its log line above")
            elif code != 0 and not booted:
                now = time.monotonic()
                self.state.crashes = [t for t in self.state.crashes if now - t < CRASH_WINDOW] + [now]
                if len(self.state.crashes) >= CRASH_LIMIT:
                    self.fail(exit_codes.CRASH_LOOP, f"{CRASH_LIMIT} workers died before their first "
                                                     f"heartbeat in the last {CRASH_WINDOW:g} s")

    def prune_reply_events(self) -> None:
        if removed := stream.prune(self.db, self.housekeeping.config, time.time()):
            self.log.info("pruned old reply events", rows=removed)

    def recover_orphans(self) -> None:
        """Tasks held by workers of an earlier run that are gone (the manager was killed before
        it could reap them) are failed attempts now, not when their leases run out."""
        for row in self.db.execute(statements(self.db).RUNNING_WORKERS):
            pid = pid_of(row["worker"])  # None for another host's worker: its own daemon, or its lease, decides
            if pid is None or is_worker_alive(pid):
                continue
            lost = fail_worker_tasks(self.db, row["worker"], f"worker {row['worker']} died (found at start-up)",
                                     jitter=self.config.queue_backoff_jitter)
            self.log.warning("requeued tasks of a worker from an earlier run", worker=row["worker"],
                             tasks=len(lost))

    def stop_hung_workers(self) -> None:
        """Kill a worker that is past its task's deadline (a handler deaf to the timeout), over
        the memory kill limit (read from outside, so a handler growing mid-task is seen), holding
        the database's write lock too long (frozen in a commit: everyone else waits on it), or
        silent while idle. ``reap`` then records its task's attempt with the reason."""
        now = time.monotonic()  # the slots' clock: a step of the wall clock moves no deadline
        for pid, child in list(self.workers.items()):
            slot = self.slots.get(child.slot)
            if slot["deadline"] and now > slot["deadline"] + HUNG_GRACE:
                self.kill(child, "timed out: the handler ignored its timeout and its worker was killed")
            elif slot["beat"] and not slot["task"] and now - slot["beat"] > IDLE_HEARTBEAT_LIMIT:
                self.kill(child, f"worker {worker_id(pid)} stopped responding and was killed")

    def probe_workers(self) -> None:
        """The checks read from outside the workers (psutil, /proc/locks, the database): see
        ``stop_hung_workers``."""
        for pid, child in list(self.workers.items()):
            rss_mb = self.rss_mb(pid)
            if rss_mb > self.config.workers_kill_memory_mb:
                self.kill(child, f"killed: its worker used {rss_mb:.0f} MiB, over workers.kill_memory_mb = "
                                 f"{self.config.workers_kill_memory_mb}")
        self.stop_lock_hog(time.monotonic())
        self.stop_cancelled(time.time())

    def stop_cancelled(self, now: float) -> None:
        """A handler still running well past its cancel's grace (deaf to the interrupt, stuck
        in C): its worker is replaced, and the task ends cancelled (see the fail statements)."""
        before = now - self.config.workers_cancel_grace - HUNG_GRACE
        for row in self.db.execute(statements(self.db).CANCEL_OVERDUE, dict(before=before)):
            child = self.workers.get(pid_of(row["worker"]))
            if child is not None:
                self.kill(child, f"cancelled: task {row['id']} did not stop within "
                                 f"workers.cancel_grace = {self.config.workers_cancel_grace:g} s; its worker was killed")

    def answer_requests(self) -> None:
        """Drain or stop the workers the dashboard asked for (helpers/worker_requests.py)."""
        by_id = {worker_id(pid): child for pid, child in self.workers.items()}
        for worker, action in worker_requests.take(self.db, set(by_id)):
            if action == "drain":
                self.drain(by_id[worker], "asked to drain from the dashboard")
            else:
                self.kill(by_id[worker], f"stopped: worker {worker} was stopped from the dashboard")

    def stop_lock_hog(self, now: float) -> None:
        if not self.db.capabilities.single_writer:  # a server's locks are per row: one worker cannot stop the rest
            return
        holder = write_lock_holder(self.config.db_path)
        if holder != self.lock_holder[0]:
            self.lock_holder = (holder, now)
        held = now - self.lock_holder[1]
        if holder in self.workers and held > self.config.database_lock_hold_limit:
            self.kill(self.workers[holder], f"killed: its worker held the database's write lock for {held:.0f} s "
                                            f"(over database.lock_hold_limit = {self.config.database_lock_hold_limit:g})")

    def scale(self) -> None:
        """Target = what the policy says for the running + ready work, plus the signals' bias."""
        now = time.monotonic()
        ready = self.ready_served()
        busy = sum(1 for c in self.live() if self.slots.get(c.slot)["task"])
        # The policy works on its own previous target; the SIGTTIN/SIGTTOU bias sits on top.
        decision = self.scaler.decide(self.state.base, ready, busy)
        self.state.base = decision.target
        target = max(1, min(decision.target + self.state.bias, self.config.workers_max + max(0, self.state.bias)))
        reason = decision.reason
        if self.state.bias:
            reason += f"; {self.state.bias:+d} by SIGTTIN/SIGTTOU: target {target}"
        if target != self.state.target:
            self.log.info("scaling", target=target, previous=self.state.target, busy=busy, ready=ready,
                          reason=reason, bias=self.state.bias)
        self.state.target = target
        self.state.decision = {"target": target, "reason": reason, "at": decision.at}
        pressure = self.scaler.check_memory_pressure()
        if pressure.memory_high and now >= self.recycle_after and self.live():
            self.recycle_after = now + self.config.workers_scale_down_cooldown
            largest = max(self.live(), key=lambda c: self.slots.get(c.slot)["rss_mb"])
            self.drain(largest, f"memory {pressure.memory_percent:.0f}%: recycling the largest worker")

    def reconcile(self) -> None:
        """Start missing workers; stop extra ones: the longest idle first, never one in a task."""
        live = self.live()
        for _ in range(self.state.target - len(live)):
            self.spawn()
        extra = len(live) - self.state.target
        if extra <= 0:
            return
        free = [(self.slots.get(c.slot), c) for c in live]
        # Waiting for work (idle > 0) before between tasks; the longest waiting first.
        free = sorted(((slot["idle"] or float("inf"), c) for slot, c in free if not slot["task"]),
                      key=lambda pair: pair[0])
        for _, child in free[:extra]:
            self.drain(child, "scale down")

    def send_ready(self) -> None:
        if self.state.ready_sent:
            return
        started = [c for c in self.live() if self.slots.get(c.slot)["beat"]]
        if len(started) >= min(self.state.target, self.config.workers_min) and self.api_ready():
            self.state.ready_sent = True
            self.notifier.ready(self.status_line())
            self.log.info("ready", workers=len(started))

    def ping_watchdog(self) -> None:
        # While the database refuses writes, no ping: systemd restarts us. A full disk keeps
        # the pings going (the loop runs and a restart cannot free space), and so does a drain.
        if self.state.stopping or self.housekeeping.healthy() or self.housekeeping.disk_full:
            self.notifier.watchdog()

    def report_status(self) -> None:
        self.notifier.status(self.status_line())
        self.write_status()

    def log_metrics(self) -> None:
        self.log.info("metrics", **self.metrics())

    def sleep(self, seconds: float) -> None:
        # The wakeup fd makes a signal end the sleep at once.
        select.select([self.wakeup_r], [], [], seconds)
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    # -- shutdown ---------------------------------------------------------------------------

    def shutdown(self) -> int:
        self.notifier.stopping("draining workers")
        if self.api is not None:
            self.api.stop()  # no new work from outside while the workers drain
        running = sum(1 for c in self.workers.values() if self.slots.get(c.slot)["task"])
        timeout = self.config.workers_stop_timeout
        self.log.info(f"stopping: waiting for {running} running task{'s' if running != 1 else ''}, up to "
                      f"{timeout:g} s; Ctrl-C again to stop now", workers=len(self.workers),
                      running=running, timeout=timeout)
        stopping = list(self.workers)
        for child in self.workers.values():
            self.signal(child, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        forced = False
        while self.workers and time.monotonic() < deadline and not forced:
            self.sleep(0.05)
            for pid, child in list(self.workers.items()):
                if not child.process.is_alive():
                    child.process.join()
                    del self.workers[pid]
            forced = any(s in (signal.SIGTERM, signal.SIGINT) for s in self.signals)
            run_due(self.watchdog, time.monotonic(), self.step_failed)
        for pid, child in list(self.workers.items()):
            running = int(self.slots.get(child.slot)["task"])
            self.log.warning("worker did not stop in time; killing it", pid=pid, forced=forced,
                             task_id=running or None)
            self.kill(child)
            child.process.join(5)
            if running:  # a run cut short is an attempt, with its reason; it is never free
                why = "forced stop" if forced else f"still running {timeout:g} s after the stop request"
                self.guarded(functools.partial(fail_task, self.db, running, worker_id(pid), f"killed at shutdown: {why}",
                                               jitter=self.config.queue_backoff_jitter))
        # Whatever the stopped workers claimed but never started goes back untouched.
        released = 0
        try:
            released = sum(release_worker_tasks(self.db, worker_id(pid)) for pid in stopping)
        except Exception as e:  # their leases run out instead; the next start recovers them too
            self.log.error("could not give back the stopped workers' tasks", error=f"{type(e).__name__}: {e}")
        self.write_status(stopped=True)
        self.log.info("stopped", tasks_released=released, exit_code=self.state.exit_code)
        self.db.close()
        return self.state.exit_code

    # -- helpers ----------------------------------------------------------------------------

    def fail(self, code: int, message: str) -> None:
        if not self.state.stopping:
            self.log.critical("stopping the daemon", reason=message, exit_code=code)
            self.state.exit_code, self.state.stopping, self.state.reason = code, True, message

    def live(self) -> list[Child]:
        return [c for c in self.workers.values() if not c.draining]

    def served_queues(self) -> set[str]:
        """The queues this daemon's workers claim from: ``workers.queues``, else every queue a
        loaded task module has a handler for. Tasks in other queues wait for a daemon that
        serves them; they are never claimed (and dead-lettered) here."""
        return set(self.config.workers_queues) or registered_queues()

    def ready_served(self) -> int:
        served = self.served_queues()
        return sum(n for q, n in self.housekeeping.ready.items() if q in served)

    def spawn(self) -> None:
        used = {c.slot for c in self.workers.values()}
        slot = next(i for i in range(self.slots.count) if i not in used)
        self.slots.clear(slot)
        process = self.ctx.Process(target=worker_main, name=f"oos-worker-{slot}",
                                   args=(child_config(self.config), task_modules(self.config), slot,
                                         self.slots))
        process.start()
        self.workers[process.pid] = Child(process, slot, time.monotonic())

    def rss_mb(self, pid: int) -> float:
        try:
            return psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            return 0.0

    def drain(self, child: Child, reason: str) -> None:
        child.draining, child.drain_reason = True, reason
        self.log.info("stopping worker", pid=child.process.pid, reason=reason)
        self.signal(child, signal.SIGTERM)

    def signal(self, child: Child, signum: int) -> None:
        try:
            os.kill(child.process.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self, child: Child, reason: str = "") -> None:
        if reason and not child.kill_reason:
            child.kill_reason = reason
            self.log.error("killing worker", pid=child.process.pid, reason=reason)
        self.signal(child, signal.SIGKILL)

    def reload(self) -> None:
        """SIGHUP: the new config everywhere it is read (here, housekeeping, the API, new
        workers: the running ones are drained), except what takes a restart. A config that
        cannot be read or is wrong changes nothing."""
        self.notifier.reloading()
        try:
            config, waiting = reload_config(self.config)
            load_task_modules(task_modules(config))
            registry.publish(self.db)
        except Exception as e:  # whatever it is, the running daemon goes on as it was
            self.log.error(f"reload refused: {e}; keeping the running config", error=str(e))
            self.notifier.ready(self.status_line())
            return
        if waiting:
            self.log.warning(f"reload: {', '.join(waiting)} take effect at restart; the running values stay",
                             settings=waiting)
        self.config = config
        self.scaler = ResourceManager(config)
        metrics = self.job("metrics")  # the jobs read no config of their own
        metrics.every = config.log_metrics_interval
        metrics.next_at = min(metrics.next_at, time.monotonic() + metrics.every)
        self.housekeeping.reload(config)
        if self.api is not None:
            self.api.reload(child_config(config))
        for child in self.live():
            self.drain(child, "config reloaded")
        self.log.info("config reloaded")
        self.notifier.ready(self.status_line())

    def api_ready(self) -> bool:
        return self.api is None or self.api.ready()

    def status_line(self) -> str:
        busy = sum(1 for c in self.live() if self.slots.get(c.slot)["task"])
        degraded = "degraded: the disk is full; " if self.housekeeping.disk_full else ""
        return (f"{degraded}{len(self.live())} workers ({busy} busy, target {self.state.target}), "
                f"{self.ready_served()} tasks ready")

    def worker_rows(self) -> list[dict]:
        rows = []
        shift = time.time() - time.monotonic()  # the slots' monotonic times, shown as wall times

        def wall(t: float) -> float | None:
            return t + shift if t else None

        for pid, child in sorted(self.workers.items()):
            slot = self.slots.get(child.slot)
            rows.append({"pid": pid, "id": worker_id(pid), "task_id": int(slot["task"]) or None,
                         "rss_mb": round(slot["rss_mb"], 1), "tasks_done": int(slot["done"]),
                         "started_at": wall(slot["started"]), "last_beat": wall(slot["beat"]),
                         "idle_since": wall(slot["idle"]), "draining": child.draining,
                         "task_started": wall(slot["task_since"]) if slot["task"] else None,
                         "drain_reason": child.drain_reason or None})
        return rows

    def metrics(self) -> dict:
        process = psutil.Process()
        return {
            "memory_percent": psutil.virtual_memory().percent,
            "cpu_percent": psutil.cpu_percent(interval=None),  # since the previous metrics line
            "load1": round(psutil.getloadavg()[0], 2),
            "manager_rss_mb": round(process.memory_info().rss / 2**20, 1),
            "workers_rss_mb": round(sum(r["rss_mb"] for r in self.worker_rows()), 1),
            "queue_ready": self.housekeeping.ready,
            "workers_desired": self.state.target,
            "workers_actual": len(self.live()),
            "breakers": {b["queue"]: b["state"] for b in breakers.all_status(self.db) if b["state"] != "closed"},
        }

    def write_status(self, stopped: bool = False) -> None:
        status = {"pid": os.getpid(), "running": not stopped, "workers_desired": self.state.target,
                  "workers_actual": len(self.live()), "workers": self.worker_rows(),
                  "last_scaling": self.state.decision, "bias": self.state.bias,
                  "queues": queue_names(self.db), "served_queues": sorted(self.served_queues()),
                  "handlers": sorted(REGISTRY),
                  "ready": self.housekeeping.ready, "integrity": self.housekeeping.integrity,
                  "checkpoint": self.housekeeping.checkpoint}
        try:
            daemon_status.beat(self.db, status, [worker_id(pid) for pid in self.workers], self.started_at, stopped)
        except Exception as e:
            self.log.error("cannot write status", error=f"{type(e).__name__}: {e}")

    def install_signals(self) -> None:
        self.wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
        for signum in SIGNALS:
            signal.signal(signum, lambda n, f: self.signals.append(n))


def child_config(config: Config) -> Config:
    """Workers and the API never checkpoint the WAL themselves: a checkpoint's fsync of the
    database file would land on some task's or request's latency. The manager does it."""
    return config.replace(database_wal_autocheckpoint=0)


def main(argv=None) -> int:
    """Run the daemon in the foreground until stopped; returns the exit code. ``argv`` (default
    the command line's) takes only ``--help``: the settings are the config file's and OOS_*'s."""
    argparse.ArgumentParser(prog="oos_service_manager.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="Settings: the config file and OOS_* variables (README, Configuration).").parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("oos: OOS runs on Linux only", file=sys.stderr)
        return exit_codes.PLATFORM
    try:
        config = load_config()
        log.configure(config.log_level, process="manager")
    except ValueError as e:
        print(f"oos: {e}", file=sys.stderr)
        return exit_codes.CONFIG
    logger = log.get_logger()

    def refuse(code: int, message: str, **details) -> int:
        logger.critical("cannot start", error=message, exit_code=code, **details)
        if not log.is_console():  # the console log line already said it in one line
            print(f"oos: {message}", file=sys.stderr)
        return code

    try:
        load_task_modules(task_modules(config))
    except TaskModuleError as e:
        return refuse(exit_codes.IMPORT, str(e))
    try:
        schedules = periodic.configured(config)
    except InvalidField as e:
        return refuse(exit_codes.CONFIG, f"config {e}")
    os.umask(0o077)  # the database, its WAL, backups and the token: readable by this user only
    try:
        lock = hold_database(config)
    except DaemonRunning as e:
        return refuse(exit_codes.DATABASE, f"{e}; start the daemon when it is done")
    except OSError as e:
        return refuse(exit_codes.DATABASE, f"cannot lock the database {config.db_path}: {e}")
    sqlite = capabilities(config).local_file
    if sqlite and not config.db_path.exists() and not config.database_allow_new and (earlier := signs_of_earlier_data(config)):
        return refuse(exit_codes.DATABASE, f"no database at {config.db_path}, but {', '.join(earlier)} show there "
                      f"was one: restore it (oos restore [NAME]), or set database.allow_new = true to start empty")
    try:
        if sqlite:
            recover_if_corrupt(config, logger)  # before anything opens the file
            vacuum_if_fragmented(get_database(config), log=logger)
        db = get_database(config)  # creates or upgrades the schema; the manager opens its own
        limits.apply_declared(db, config)
        periodic.register(db, schedules)
        registry.publish(db)  # the handlers' declared defaults, for enqueues from anywhere
        db.close()
        load_or_create_token(config)
        metrics_dir = make_metrics_dir()
        manager = ServiceManager(config, schedules=schedules)
    except InvalidField as e:
        return refuse(exit_codes.CONFIG, f"config {e}")
    except Exception as e:  # e.g. a full disk: one line and exit 5, never a traceback
        return refuse(exit_codes.DATABASE, f"cannot start on the database {describe(config)}: "
                      f"{type(e).__name__}: {str(e).strip()}")
    code = manager.run()
    if code and not log.is_console():
        print(f"oos: {manager.state.reason}", file=sys.stderr)
    shutil.rmtree(metrics_dir, ignore_errors=True)
    lock.close()
    return code


def make_metrics_dir() -> str:
    """Where workers and the API write their prometheus-client metrics (/metrics merges them).
    Never on the data disk: those files are memory-mapped, and a mapped file that cannot grow on
    a full disk kills its process with SIGBUS. systemd's RuntimeDirectory (tmpfs), else /dev/shm."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        path = os.path.join(runtime, "metrics")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, mode=0o700)
    else:
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        path = tempfile.mkdtemp(prefix="oos-metrics-", dir=shm)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


if __name__ == "__main__":
    sys.exit(main())
