"""The daemon's periodic database jobs, each on its own interval, each wrapped once.

| job       | every        | what                                                              |
| --------- | ------------ | ----------------------------------------------------------------- |
| periodic  | 1 s          | enqueue the periodic tasks whose slot came (helpers/periodic.py)  |
| leases    | 1 s          | expired leases back to the queue (the one owner of this under the |
|           |              | daemon), ready counts for scaling, a passive WAL checkpoint; the  |
|           |              | database file must still be the one opened (else the daemon stops)|
| disk      | 60 s         | over the disk threshold: drop old backups and finished tasks      |
| history   | 60 s         | each queue's counters and depth, for the dashboard's charts       |
| prune     | 1 h          | finished and dead tasks past retention, results past their TTL    |
| integrity | 24 h (config)| ``integrity_check``; vacuum a fragmented file                     |

A job that raises is logged and tried again at its next turn; it never stops the loop. The
``leases`` job is also the watchdog's proof that the database takes writes (``db_ok_at``).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

from helpers import daemon_status, history, periodic
from helpers.backup import vacuum_if_fragmented
from helpers.config import Config
from helpers.engine import Database
from helpers.jobs import Job, run_due
from helpers.queue_manager import prune, ready_counts, rebase_times, requeue_expired
from helpers.resource_manager import ResourceManager

CLOCK_STEP = 2.0  # seconds the wall clock must jump (against the monotonic one) to count as a step


class Housekeeping:
    def __init__(self, db: Database, config: Config, log, clock: Callable[[], float] = time.monotonic,
                 schedules: list[periodic.Schedule] = ()):
        self.db, self.config, self.log, self.clock = db, config, log, clock
        self.schedules = list(schedules)
        self.resources = ResourceManager(config)
        self.ready: dict[str, int] = {}   # ready tasks per queue, as of the last leases job
        self.db_ok_at = -1e9              # monotonic time of the last successful leases job
        self.failure: str | None = None   # set when the daemon must stop (integrity failed)
        self.disk_full = False            # the last leases job failed for want of space
        self.checkpoint: dict | None = None  # SQLite's answer to the last checkpoint, and when
        self.clock_offset = time.time() - time.monotonic()  # the wall clock's distance to the monotonic one
        self.jobs = [Job("leases", 1.0, self.expire_leases), Job("rescue", 2.0, self.rescue_dead_daemons),
                     Job("history", 60.0, self.record_history), Job("prune", 3600.0, self.prune)]
        if self.schedules:
            self.jobs.insert(0, Job("periodic", 1.0, self.run_schedules))
        self.inode = None
        if db.capabilities.local_file:  # the file, its disk and its pages are ours to look after
            # start-up ran quick_check (recover_if_corrupt); the daily full check replaces this
            self.integrity = {"at": time.time(), "ok": True, "problems": [], "kind": "quick_check at start"}
            self.inode = os.stat(db.path).st_ino
            day_check = config.database_integrity_check_hours * 3600
            self.jobs += [Job("disk", 60.0, self.clean_disk),
                          Job("integrity", day_check, self.check_integrity, next_at=clock() + day_check)]
        else:  # the server's: data checksums, pg_amcheck, its own disk
            self.integrity = {"at": time.time(), "ok": None, "problems": [], "kind": "the PostgreSQL server's own"}

    def run_due(self) -> None:
        """Run every job whose time has come."""
        run_due(self.jobs, self.clock(), self.failed)

    def failed(self, job: Job, e: Exception) -> None:
        if job.name == "leases":
            self.disk_full = "full" in str(e)
        self.log.error(f"{job.name} job failed", error=f"{type(e).__name__}: {e}")

    def healthy(self, within: float = 5.0) -> bool:
        """True while the database took the leases job's write in the last ``within`` seconds."""
        return self.clock() - self.db_ok_at < within

    # -- the jobs ---------------------------------------------------------------------------

    def expire_leases(self) -> None:
        try:
            replaced = self.inode is not None and os.stat(self.db.path).st_ino != self.inode
        except FileNotFoundError:
            replaced = True
        if replaced:  # writes would go to a file nobody will ever read again
            self.failure = f"the database file {self.db.path} was removed or replaced under the daemon"
            return
        self.watch_clock()  # before leases are judged by a clock that may just have stepped
        # On PostgreSQL every daemon does this, timed by the server's clock: no leader to lose.
        expired = requeue_expired(self.db, jitter=self.config.queue_backoff_jitter)
        if expired:
            self.log.warning("expired leases requeued", tasks=len(expired))
        self.ready = ready_counts(self.db, time.time())
        checkpoint = self.db.checkpoint()  # workers and the API leave checkpoints to us
        if checkpoint is not None:
            self.checkpoint = dict(checkpoint, at=time.time())
        self.db_ok_at, self.disk_full = self.clock(), False

    def run_schedules(self) -> None:
        for name, slot, task_id in periodic.tick(self.db, self.schedules, self.config, log=self.log):
            self.log.info("periodic task enqueued" if task_id else "periodic slot skipped", schedule=name,
                          slot=slot, task_id=task_id)

    def watch_clock(self) -> None:
        """Notice a step of the wall clock (NTP, an admin's date) as a change of its distance to
        the monotonic clock, and log it. Where the stored times are this host's own (SQLite),
        move the running tasks' leases and the delayed tasks' due times by the step, so a
        step forward expires no lease (a second run of a running task) and one back delays no
        task by the step."""
        offset = time.time() - time.monotonic()
        step, self.clock_offset = offset - self.clock_offset, offset
        if abs(step) < CLOCK_STEP:
            return
        moved = 0 if self.db.capabilities.server_clock else rebase_times(self.db, step, time.time())
        self.log.warning(f"the wall clock stepped by {step:+.1f} s", step=round(step, 3), tasks_moved=moved,
                         clock="the database server's clock times leases and due tasks; nothing to move"
                         if self.db.capabilities.server_clock else "this host's")

    def reload(self, config: Config) -> None:
        """Read ``config`` from now on (the daemon reloaded it)."""
        self.config = config
        self.resources = ResourceManager(config)

    def rescue_dead_daemons(self) -> None:
        for dead in daemon_status.rescue(self.db, self.config.cluster_dead_after,
                                         jitter=self.config.queue_backoff_jitter):
            self.log.warning("daemon stopped answering: its tasks failed as an attempt", daemon=dead["daemon"],
                             host=dead["host"], last_beat=dead["updated_at"], tasks=len(dead["tasks"]))

    def record_history(self) -> None:
        history.record(self.db, self.config)

    def clean_disk(self) -> None:
        report = self.resources.cleanup_disk_space(self.config.data_dir, self.db)
        if report["freed_bytes"] or report["rows_pruned"]:
            self.log.warning("disk above threshold: cleaned up", **report)

    def prune(self) -> None:
        removed = prune(self.db, self.config, time.time())
        daemon_status.forget_gone(self.db)
        if removed:
            self.log.info("pruned old tasks", rows=removed)

    def check_integrity(self) -> None:
        """The daily full check. A damaged file stops the daemon (exit 5): systemd starts it
        again, and start-up restores the newest good backup."""
        report = self.db.check_integrity()
        self.integrity = {"at": time.time(), "ok": report.ok, "problems": report.problems[:3],
                          "kind": "integrity_check"}
        if not report:
            self.failure = f"integrity check failed: {report.problems[:3]}"
            return
        self.log.info("integrity check passed")
        vacuum_if_fragmented(self.db, log=self.log)
