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

import json
import multiprocessing
import os
import select
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import psutil

from api.auth import load_or_create_token
from api.server import answers as api_answers
from api.server import main as api_main
from helpers import breaker as breakers
from helpers import log
from helpers.backup import recover_if_corrupt, vacuum_if_fragmented
from helpers.config import Config, load_config
from helpers.queue_manager import (
    fail_worker_tasks,
    get_database,
    prune,
    queue_names,
    ready_counts,
    release_worker_tasks,
    requeue_expired,
)
from helpers.resource_manager import ResourceManager
from helpers.systemd import Notifier
from helpers.tasks import TaskModuleError, load_task_modules
from helpers.worker import RET_BOOT, Slots
from helpers.worker import main as worker_main

# Named exit codes: systemd's Restart= policy and the operator read these.
RET_OK = 0
RET_CONFIG = 2      # the config file or environment is invalid
RET_IMPORT = 3      # a task module failed to import (also: a worker could not boot)
RET_CRASH_LOOP = 4  # workers keep dying right after start
RET_DATABASE = 5    # the database cannot be opened or is corrupt beyond recovery
RET_PLATFORM = 6    # not Linux
RET_API = 7         # the API cannot start (its address is taken)

TICK = 0.2
HUNG_GRACE = 10.0         # seconds past a task's deadline before its worker is killed
IDLE_HEARTBEAT_LIMIT = 60.0
CRASH_WINDOW, CRASH_LIMIT = 60.0, 5  # workers dead before their first heartbeat
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


@dataclass
class Child:
    process: multiprocessing.Process
    slot: int
    started: float
    draining: bool = False
    drain_reason: str = ""


class ApiProcess:
    """The API server child: started at boot, restarted when it dies, READY waits for it."""

    def __init__(self, ctx, config: Config, logger):
        self.ctx, self.config, self.log = ctx, config, logger
        self.process = None
        self.answered = False
        self.restarts: list[float] = []
        self.next_start = 0.0

    def supervise(self) -> str | None:
        """Start or restart as needed; returns a reason to stop the daemon, if any."""
        if self.process is not None and self.process.is_alive():
            return None
        now = time.monotonic()
        if self.process is not None:
            self.process.join()
            self.log.warning("API process exited; restarting it", exit_code=self.process.exitcode)
            self.restarts = [t for t in self.restarts if now - t < CRASH_WINDOW] + [now]
            if not self.answered and len(self.restarts) >= CRASH_LIMIT:
                return f"the API failed to start {CRASH_LIMIT} times (is {self.config.api_host}:{self.config.api_port} taken?)"
            self.process, self.next_start = None, now + min(10.0, 0.5 * len(self.restarts))
        if now >= self.next_start:
            self.process = self.ctx.Process(target=api_main, name="oos-api", args=(self.config,))
            self.process.start()
        return None

    def ready(self) -> bool:
        if not self.answered and self.process is not None and self.process.is_alive():
            self.answered = api_answers(self.config, timeout=0.5)
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
    ready_sent: bool = False
    stopping: bool = False
    crashes: list = field(default_factory=list)
    exit_code: int = RET_OK


class ServiceManager:
    def __init__(self, config: Config, notifier: Notifier | None = None):
        self.config = config
        self.notifier = notifier or Notifier()
        self.log = log.get_logger()
        self.ctx = multiprocessing.get_context("spawn")
        self.slots = Slots.create(self.ctx, 2 * config.workers_max + 2)
        self.workers: dict[int, Child] = {}  # by pid
        self.state = State(target=config.workers_min, base=config.workers_min)
        self.signals: list[int] = []
        self.scaler = ResourceManager(config)
        self.db = get_database(config)
        self.next = {"watchdog": 0.0, "maintain": 0.0, "metrics": time.monotonic() + config.log_metrics_interval,
                     "prune": 0.0, "status": 0.0, "scale": 0.0, "recycle": 0.0, "disk": 0.0,
                     "integrity": time.monotonic() + config.database_integrity_check_hours * 3600}
        self.db_ok_at = 0.0
        # start-up ran quick_check (main); the daily full check replaces this
        self.last_integrity = {"at": time.time(), "ok": True, "problems": [], "kind": "quick_check at start"}
        self.ready_counts: dict[str, int] = {}
        self.api = ApiProcess(self.ctx, child_config(config), self.log) if config.api_enabled else None

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        self.install_signals()
        self.log.info("starting", pid=os.getpid(), db=str(self.config.db_path),
                      synchronous=self.config.database_synchronous, workers_min=self.config.workers_min,
                      workers_max=self.config.workers_max)
        self.notifier.status("starting workers")
        self.recover_orphans()
        while not self.state.stopping:
            self.handle_signals()
            if self.state.stopping:
                break
            self.reap()
            if self.api is not None and (reason := self.api.supervise()):
                self.fail(RET_API, reason)
            self.stop_hung_workers()
            self.maintain()
            self.scale()
            self.reconcile()
            self.report()
            self.sleep(TICK)
        return self.shutdown()

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.log.info("stop requested", signal=name)
                self.state.stopping = True
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGTTIN:
                self.state.bias += 1
                self.log.info("worker target raised by one", signal=name, bias=self.state.bias)
                self.next["scale"] = 0.0
            elif signum == signal.SIGTTOU:
                self.state.bias -= 1
                self.log.info("worker target lowered by one", signal=name, bias=self.state.bias)
                self.next["scale"] = 0.0

    def reap(self) -> None:
        """Collect exited workers; their tasks are failed attempts now, not at lease end."""
        for pid, child in list(self.workers.items()):
            if child.process.is_alive():
                continue
            child.process.join()
            code = child.process.exitcode
            booted = bool(self.slots.get(child.slot)["beat"])
            del self.workers[pid]
            self.slots.clear(child.slot)
            lifetime = time.monotonic() - child.started
            lost = fail_worker_tasks(self.db, worker_id(pid), f"worker {worker_id(pid)} died (exit code {code})",
                                     time.time(), jitter=self.config.queue_backoff_jitter)
            level = "info" if code == 0 else "warning"
            getattr(self.log, level)("worker exited", pid=pid, exit_code=code, lifetime=round(lifetime, 2),
                                     tasks_requeued=len(lost), draining=child.draining)
            if code == RET_BOOT:
                self.fail(RET_IMPORT, "a worker could not boot; see its log line above")
            elif code != 0 and not booted:
                now = time.monotonic()
                self.state.crashes = [t for t in self.state.crashes if now - t < CRASH_WINDOW] + [now]
                if len(self.state.crashes) >= CRASH_LIMIT:
                    self.fail(RET_CRASH_LOOP, f"{CRASH_LIMIT} workers died before their first heartbeat "
                                              f"in the last {CRASH_WINDOW:g} s")

    def recover_orphans(self) -> None:
        """Tasks held by workers of an earlier run that are gone (the manager was killed before
        it could reap them) are failed attempts now, not when their leases run out."""
        prefix = worker_id(0).removesuffix("0")
        for row in self.db.execute("SELECT DISTINCT worker FROM tasks WHERE state = 'running'"):
            holder = row["worker"] or ""
            pid = holder.removeprefix(prefix)
            if not holder.startswith(prefix) or not pid.isdigit() or is_worker_alive(int(pid)):
                continue
            lost = fail_worker_tasks(self.db, holder, f"worker {holder} died (found at start-up)",
                                     time.time(), jitter=self.config.queue_backoff_jitter)
            self.log.warning("requeued tasks of a worker from an earlier run", worker=holder, tasks=len(lost))

    def stop_hung_workers(self) -> None:
        """A worker past its task's deadline (a handler deaf to the timeout) or silent while
        idle is killed; the task's attempt is recorded as timed out."""
        now = time.time()
        for pid, child in list(self.workers.items()):
            slot = self.slots.get(child.slot)
            if slot["deadline"] and now > slot["deadline"] + HUNG_GRACE:
                fail_worker_tasks(self.db, worker_id(pid), "timed out: the handler ignored its timeout and "
                                  "its worker was killed", now, jitter=self.config.queue_backoff_jitter)
                self.log.error("killing hung worker", pid=pid, task_id=int(slot["task"]))
                self.kill(child)
            elif slot["beat"] and not slot["task"] and now - slot["beat"] > IDLE_HEARTBEAT_LIMIT:
                self.log.error("killing unresponsive worker", pid=pid, silent_for=round(now - slot["beat"], 1))
                self.kill(child)

    def maintain(self) -> None:
        """Each second: expired leases back to the queue (this write is also the watchdog's
        proof that the database takes writes). Hourly: prune old tasks."""
        now = time.monotonic()
        if now >= self.next["maintain"]:
            self.next["maintain"] = now + 1.0
            try:
                expired = requeue_expired(self.db, time.time(), jitter=self.config.queue_backoff_jitter)
                if expired:
                    self.log.warning("expired leases requeued", tasks=len(expired))
                self.ready_counts = ready_counts(self.db, time.time())
                self.db.checkpoint()  # the children leave checkpoints to us
                self.db_ok_at = now
            except Exception as e:  # the watchdog will stop; say why
                self.log.error("database check failed", error=f"{type(e).__name__}: {e}")
        if now >= self.next["disk"]:
            self.next["disk"] = now + 60
            try:
                report = self.scaler.cleanup_disk_space(self.config.data_dir, self.db)
                if report["freed_bytes"] or report["rows_pruned"]:
                    self.log.warning("disk above threshold: cleaned up", **report)
            except Exception as e:
                self.log.error("disk cleanup failed", error=f"{type(e).__name__}: {e}")
        if now >= self.next["integrity"]:
            self.next["integrity"] = now + self.config.database_integrity_check_hours * 3600
            self.check_integrity()
        if now >= self.next["prune"]:
            self.next["prune"] = now + 3600
            try:
                removed = prune(self.db, self.config, time.time())
                if removed:
                    self.log.info("pruned old tasks", rows=removed)
            except Exception as e:
                self.log.error("prune failed", error=f"{type(e).__name__}: {e}")

    def check_integrity(self) -> None:
        """The daily full check. A damaged file stops the daemon (exit 5): systemd starts it
        again and start-up restores the newest good backup."""
        report = self.db.check_integrity()
        self.last_integrity = {"at": time.time(), "ok": report.ok, "problems": report.problems[:3]}
        if report:
            self.log.info("integrity check passed")
            vacuum_if_fragmented(self.db, log=self.log)
        else:
            self.fail(RET_DATABASE, f"integrity check failed: {report.problems[:3]}")

    def scale(self) -> None:
        now = time.monotonic()
        if now < self.next["scale"]:
            return
        self.next["scale"] = now + 1.0
        ready = sum(n for q, n in self.ready_counts.items() if self.serves(q))
        busy = sum(1 for c in self.live() if self.slots.get(c.slot)["task"])
        # The policy works on its own previous target; the SIGTTIN/SIGTTOU bias sits on top.
        decision = self.scaler.decide(self.state.base, ready)
        self.state.base = decision.target
        target = max(1, min(decision.target + self.state.bias, self.config.workers_max + max(0, self.state.bias)))
        if target != self.state.target:
            self.log.info("scaling", target=target, previous=self.state.target, busy=busy, ready=ready,
                          reason=decision.reason, bias=self.state.bias)
        self.state.target = target
        pressure = self.scaler.check_memory_pressure()
        if pressure.memory_high and now >= self.next["recycle"] and self.live():
            self.next["recycle"] = now + self.config.workers_scale_down_cooldown
            largest = max(self.live(), key=lambda c: self.slots.get(c.slot)["rss_mb"])
            self.drain(largest, f"memory {pressure.memory_percent:.0f}%: recycling the largest worker")

    def reconcile(self) -> None:
        """Start missing workers; stop extra ones, idle ones only (a busy one is never cut)."""
        live = self.live()
        for _ in range(self.state.target - len(live)):
            self.spawn()
        extra = len(live) - self.state.target
        for child in live:
            if extra <= 0:
                break
            if not self.slots.get(child.slot)["task"]:
                self.drain(child, "scale down")
                extra -= 1

    def report(self) -> None:
        now = time.monotonic()
        started = [c for c in self.live() if self.slots.get(c.slot)["beat"]]
        if not self.state.ready_sent and len(started) >= min(self.state.target, self.config.workers_min) \
                and self.api_ready():
            self.state.ready_sent = True
            self.notifier.ready(self.status_line())
            self.log.info("ready", workers=len(started))
        healthy = now - self.db_ok_at < 5.0
        if self.notifier.watchdog_interval and now >= self.next["watchdog"] and healthy:
            self.next["watchdog"] = now + self.notifier.watchdog_interval
            self.notifier.watchdog()
        if now >= self.next["status"]:
            self.next["status"] = now + 1.0
            self.notifier.status(self.status_line())
            self.write_status()
        if now >= self.next["metrics"]:
            self.next["metrics"] = now + self.config.log_metrics_interval
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
        self.log.info("stopping", workers=len(self.workers), timeout=self.config.workers_stop_timeout)
        stopping = list(self.workers)
        for child in self.workers.values():
            self.signal(child, signal.SIGTERM)
        deadline = time.monotonic() + self.config.workers_stop_timeout
        forced = False
        while self.workers and time.monotonic() < deadline and not forced:
            self.sleep(0.05)
            for pid, child in list(self.workers.items()):
                if not child.process.is_alive():
                    child.process.join()
                    del self.workers[pid]
            forced = any(s in (signal.SIGTERM, signal.SIGINT) for s in self.signals)
            if self.notifier.watchdog_interval and time.monotonic() >= self.next["watchdog"]:
                self.next["watchdog"] = time.monotonic() + self.notifier.watchdog_interval
                self.notifier.watchdog()
        for pid, child in list(self.workers.items()):
            self.log.warning("worker did not stop in time; killing it", pid=pid, forced=forced)
            self.kill(child)
            child.process.join(5)
        # Whatever the stopped workers still hold goes back now, not at lease end.
        released = sum(release_worker_tasks(self.db, worker_id(pid)) for pid in stopping)
        self.write_status(stopped=True)
        self.log.info("stopped", tasks_released=released, exit_code=self.state.exit_code)
        self.db.close()
        return self.state.exit_code

    # -- helpers ----------------------------------------------------------------------------

    def fail(self, code: int, message: str) -> None:
        self.log.critical("stopping the daemon", reason=message, exit_code=code)
        self.state.exit_code = code
        self.state.stopping = True

    def live(self) -> list[Child]:
        return [c for c in self.workers.values() if not c.draining]

    def serves(self, queue: str) -> bool:
        return not self.config.workers_queues or queue in self.config.workers_queues

    def spawn(self) -> None:
        used = {c.slot for c in self.workers.values()}
        slot = next(i for i in range(self.slots.count) if i not in used)
        self.slots.clear(slot)
        process = self.ctx.Process(target=worker_main, name=f"oos-worker-{slot}",
                                   args=(child_config(self.config), slot, self.slots, os.getpid()))
        process.start()
        self.workers[process.pid] = Child(process, slot, time.monotonic())

    def drain(self, child: Child, reason: str) -> None:
        child.draining, child.drain_reason = True, reason
        self.log.info("stopping worker", pid=child.process.pid, reason=reason)
        self.signal(child, signal.SIGTERM)

    def signal(self, child: Child, signum: int) -> None:
        try:
            os.kill(child.process.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self, child: Child) -> None:
        self.signal(child, signal.SIGKILL)

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            config = load_config()
            load_task_modules(config.task_modules)
        except (ValueError, TaskModuleError) as e:
            self.log.error("reload refused; keeping the running config", error=str(e))
            self.notifier.ready(self.status_line())
            return
        if config.db_path != self.config.db_path or config.workers_max != self.config.workers_max:
            self.log.warning("database path and workers_max take effect at restart only")
            config = config.replace(database_path=self.config.database_path, data_dir=self.config.data_dir,
                                    workers_max=self.config.workers_max)
        self.config = config
        self.scaler = ResourceManager(config)
        for child in self.live():
            self.drain(child, "config reloaded")
        self.log.info("config reloaded")
        self.notifier.ready(self.status_line())

    def api_ready(self) -> bool:
        return self.api is None or self.api.ready()

    def status_line(self) -> str:
        ready = sum(n for q, n in self.ready_counts.items() if self.serves(q))
        busy = sum(1 for c in self.live() if self.slots.get(c.slot)["task"])
        return f"{len(self.live())} workers ({busy} busy, target {self.state.target}), {ready} tasks ready"

    def worker_rows(self) -> list[dict]:
        rows = []
        for pid, child in sorted(self.workers.items()):
            slot = self.slots.get(child.slot)
            rows.append({"pid": pid, "id": worker_id(pid), "task_id": int(slot["task"]) or None,
                         "rss_mb": round(slot["rss_mb"], 1), "tasks_done": int(slot["done"]),
                         "started_at": slot["started"] or None, "last_beat": slot["beat"] or None,
                         "draining": child.draining})
        return rows

    def metrics(self) -> dict:
        process = psutil.Process()
        return {
            "memory_percent": psutil.virtual_memory().percent,
            "cpu_percent": psutil.cpu_percent(interval=None),  # since the previous metrics line
            "load1": round(psutil.getloadavg()[0], 2),
            "manager_rss_mb": round(process.memory_info().rss / 2**20, 1),
            "workers_rss_mb": round(sum(r["rss_mb"] for r in self.worker_rows()), 1),
            "queue_ready": self.ready_counts,
            "workers_desired": self.state.target,
            "workers_actual": len(self.live()),
            "breakers": {b["queue"]: b["state"] for b in breakers.all_status(self.db) if b["state"] != "closed"},
        }

    def write_status(self, stopped: bool = False) -> None:
        decision = self.scaler.last.to_dict() if self.scaler.last else None
        status = {"pid": os.getpid(), "running": not stopped, "workers_desired": self.state.target,
                  "workers_actual": len(self.live()), "workers": self.worker_rows(),
                  "last_scaling": decision, "bias": self.state.bias,
                  "queues": queue_names(self.db), "ready": self.ready_counts,
                  "integrity": self.last_integrity}
        try:
            self.db.execute("INSERT INTO daemon_status (id, pid, updated_at, status) VALUES (1, ?, ?, ?) "
                            "ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, updated_at = excluded.updated_at, "
                            "status = excluded.status", (os.getpid(), time.time(), json.dumps(status)))
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


def worker_id(pid: int) -> str:
    """The id a worker process uses in the tasks table (see helpers.worker.Worker)."""
    return f"{os.uname().nodename}:{pid}"


def is_worker_alive(pid: int) -> bool:
    """True if ``pid`` is a running OOS worker (a multiprocessing child, not a reused pid)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and "multiprocessing" in " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def main(argv=None) -> int:
    """Run the daemon in the foreground until stopped; returns the exit code."""
    if not sys.platform.startswith("linux"):
        print("oos: OOS runs on Linux only", file=sys.stderr)
        return RET_PLATFORM
    try:
        config = load_config()
        log.configure(config.log_level, process="manager")
    except ValueError as e:
        print(f"oos: {e}", file=sys.stderr)
        return RET_CONFIG
    logger = log.get_logger()
    try:
        load_task_modules(config.task_modules)
    except TaskModuleError as e:
        logger.critical("cannot start", error=str(e), exit_code=RET_IMPORT)
        print(f"oos: {e}", file=sys.stderr)
        return RET_IMPORT
    try:
        recover_if_corrupt(config, logger)  # before anything opens the file
        db = get_database(config)
        vacuum_if_fragmented(db, log=logger)
    except Exception as e:
        logger.critical("cannot open the database", error=f"{type(e).__name__}: {e}", exit_code=RET_DATABASE)
        print(f"oos: cannot open the database {config.db_path}: {e}", file=sys.stderr)
        return RET_DATABASE
    load_or_create_token(config)
    # Workers and the API write their prometheus-client metrics here; /metrics merges them.
    metrics_dir = config.data_dir / "run" / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return ServiceManager(config).run()


if __name__ == "__main__":
    sys.exit(main())
