"""What the HTTP API and the ``oos`` command show, built in one place from the database.

Both surfaces work on the database directly, so everything here works while the daemon is down.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from helpers import breaker as breakers
from helpers import daemon_status as daemons
from helpers import history, process
from helpers.backup import free_page_fraction, last_recovery, list_backups
from helpers.config import Config
from helpers.engine import Database
from helpers.queue_manager import QueueManager, queue_names, ready_counts
from helpers.resource_manager import disk_used
from helpers.times import iso

RATE_WINDOW = 15 * 60.0  # seconds of history behind "the current rate" of time-to-drain
STATUS_FRESH = 10.0  # seconds: older daemon status means the daemon is not running
DISK_FAIL_PERCENT = 95.0
FULL_BELOW = 16 * 2**20  # bytes free (or 1 % of the disk) under which a silent daemon is taken to be out of space


def queue(db: Database, config: Config, name: str) -> QueueManager:
    return QueueManager(name, db, config)


def queue_stats(db: Database, config: Config, name: str, daemon: dict | None = None) -> dict:
    """One queue's stats with its breaker, whether the running daemon serves it, and alerts."""
    stats = queue(db, config, name).stats()
    stats["breaker"] = breakers.status(db, name)
    alerts = []
    if stats["depth_alert"]:
        alerts.append(f"depth: {stats['counts']['queued']} queued > {config.queue_depth_alert}")
    if stats["breaker"]["state"] != "closed":
        alerts.append(f"breaker {stats['breaker']['state']}")
    if stats["counts"]["dead"]:
        alerts.append(f"dead letters: {stats['counts']['dead']}")
    if stats["paused"]:
        alerts.append("paused")
    daemon = daemon_status(db, config) if daemon is None else daemon
    # Whether the running daemon claims from this queue (None: no daemon is running).
    stats["served"] = name in daemon.get("served_queues", ()) if daemon["running"] else None
    if stats["served"] is False and stats["counts"]["queued"]:
        alerts.append("no worker serves this queue: its tasks wait (see workers.queues)")
    stats["alerts"] = alerts
    return stats


def all_queues(db: Database, config: Config, daemon: dict | None = None) -> list[dict]:
    """Every queue's ``queue_stats`` (``daemon``: its status, if the caller read it already)."""
    daemon = daemon_status(db, config) if daemon is None else daemon
    return [queue_stats(db, config, name, daemon) for name in queue_names(db)]


def daemon_status(db: Database, config: Config) -> dict:
    """Every daemon's last self-report, merged: ``running`` if any beats (within
    STATUS_FRESH) and runs; its workers (each with its ``daemon``), desired and actual counts
    summed; the queues served and the handlers, their union. The rest (``pid``, scaling,
    integrity) is this host's daemon's (the one holding its data directory) if it runs, else
    the latest. ``daemons``: each daemon's host, pid, start, last beat, ``age`` and
    ``alive``, the dead ones too until they are forgotten (a day)."""
    rows = daemons.rows(db)
    local = process.local_daemon(config)
    beating = [r for r in rows if r["age"] < STATUS_FRESH and r["status"].get("running")]
    beating.sort(key=lambda r: (r["daemon"] != local, r["age"]))
    merged = {"running": bool(beating), "pid": None, "updated_at": None, "workers_desired": 0,
              "workers_actual": 0, "workers": [], "last_scaling": None, "served_queues": [], "handlers": []}
    if beating:
        merged.update(beating[0]["status"], updated_at=beating[0]["updated_at"])
        merged["workers"] = [dict(w, daemon=r["daemon"]) for r in beating for w in r["status"].get("workers", [])]
        for key in ("workers_desired", "workers_actual"):
            merged[key] = sum(r["status"].get(key, 0) for r in beating)
        for key in ("served_queues", "handlers"):
            merged[key] = sorted({q for r in beating for q in r["status"].get(key, ())})
    merged["daemons"] = [{"daemon": r["daemon"], "host": r["host"], "pid": r["pid"], "started_at": r["started_at"],
                          "last_beat": r["updated_at"], "age": round(r["age"], 3), "rescued_at": r["rescued_at"],
                          "alive": r in beating, "workers": len(r["workers"]),
                          "served_queues": r["status"].get("served_queues", [])} for r in rows]
    return merged


def health(db: Database, config: Config) -> tuple[bool, dict]:
    """Named checks: database, workers, disk, breakers, last_backup (and recovery, for a day
    after one). Healthy when none fails; open breakers and an old backup only warn. A check
    that raises fails with the error as its detail."""
    checks = {}
    for check in (database_check, workers_check, disk_check, breakers_check, last_backup_check, recovery_check):
        try:
            result = check(db, config)
        except Exception as e:
            result = {"status": "fail", "detail": f"{type(e).__name__}: {e}"}
        if result is not None:
            checks[check.__name__.removesuffix("_check")] = result
    return all(c["status"] != "fail" for c in checks.values()), checks


def database_check(db: Database, config: Config) -> dict:
    # Cheap on every probe: the file answers a read, and the daemon's last integrity check
    # (quick_check at start-up, integrity_check daily) passed. No full scan per request.
    db.execute("SELECT 1 FROM tasks LIMIT 1")
    integrity = daemon_status(db, config).get("integrity") or {}
    if integrity.get("ok") is False:
        return {"status": "fail", "detail": "integrity check failed: " + "; ".join(integrity["problems"])}
    return {"status": "ok"}


def workers_check(db: Database, config: Config) -> dict:
    daemon = daemon_status(db, config)
    if not daemon["running"]:
        return {"status": "fail", "detail": silent_daemon(db, config) or "the daemon is not running"}
    if daemon["workers_actual"] < 1:
        return {"status": "fail", "detail": "no worker is running"}
    return {"status": "ok", "detail": f"{daemon['workers_actual']} running, {daemon['workers_desired']} desired"}


def silent_daemon(db: Database, config: Config) -> str | None:
    """Why this host's daemon, alive, has not reported: its disk is full (it cannot write its
    status, nor take tasks), or something else. None when no daemon of this host is alive."""
    holders = process.lock_holders(config)  # the kernel's word: a stopped daemon's pid may linger in the file
    if not holders:
        return None
    pid = holders[0]
    if db.capabilities.local_file:
        usage = shutil.disk_usage(config.data_dir)
        if usage.free < max(FULL_BELOW, usage.total // 100):
            return (f"degraded: the disk is full ({usage.free // 2**20} MiB free): the daemon (pid {pid}) runs but "
                    "cannot write; it resumes by itself when space is freed")
    return f"the daemon (pid {pid}) runs but has not reported for over {STATUS_FRESH:g} s"


def disk_check(db: Database, config: Config) -> dict:
    percent, usage = disk_used(config.data_dir)
    status = ("fail" if percent >= DISK_FAIL_PERCENT else
              "warn" if percent >= config.resources_disk_high_percent else "ok")
    return {"status": status, "detail": f"{percent:.1f}% used, {usage.free // 2**20} MiB free"}


def breakers_check(db: Database, config: Config) -> dict:
    opened = [b["queue"] for b in breakers.all_status(db) if b["state"] != "closed"]
    return {"status": "warn", "detail": "not closed: " + ", ".join(opened)} if opened else {"status": "ok"}


def last_backup_check(db: Database, config: Config) -> dict | None:
    if not db.capabilities.local_file:  # the server's backups are not ours to see
        return None
    backups = list_backups(config)  # newest first
    if not backups:
        return {"status": "warn", "detail": "no backup yet"}
    age = time.time() - backups[0].created_at
    return {"status": "ok" if age < 86_400 else "warn", "detail": f"{backups[0].path.name}, {age / 3600:.1f} h old"}


def recovery_check(db: Database, config: Config) -> dict | None:
    recovery = last_recovery(config)
    if not recovery or time.time() - recovery["at"] >= 86_400:
        return None
    if recovery.get("kind") == "wal":
        detail = f"at {iso(recovery['at'])}: {recovery['problems'][0]} (a copy: {Path(recovery['kept']).name})"
    else:
        detail = (f"database was corrupt and restored from {Path(recovery['backup']).name} "
                  f"({recovery['backup_age_seconds'] / 3600:.1f} h behind, "
                  f"{recovery.get('salvaged_tasks', 0)} later tasks salvaged) at {iso(recovery['at'])}")
    return {"status": "warn", "detail": detail}


def database(db: Database, config: Config, now: float | None = None) -> dict:
    """The durability panel: the database's size and WAL, its last checkpoint and integrity
    check, the newest backup (each is checked with ``integrity_check`` before it gets its name),
    disk headroom, and how long the ready backlog takes to drain at the rate of the last
    RATE_WINDOW (``drain_seconds``: 0 when empty, None when nothing finished lately)."""
    now = time.time() if now is None else now
    daemon = daemon_status(db, config)
    percent, usage = disk_used(config.data_dir)
    # A running daemon counts the ready tasks every second already.
    ready = sum((daemon["ready"] if daemon["running"] else ready_counts(db, now)).values())
    rates = history.series(db, now - RATE_WINDOW)
    minutes = len(rates["minutes"])
    rate = (sum(rates["succeeded"]) + sum(rates["failed"])) / (60.0 * minutes) if minutes else 0.0
    report = {"engine": db.engine, "integrity": daemon.get("integrity"), "checkpoint": daemon.get("checkpoint"),
              "disk": {"path": str(config.data_dir), "free_bytes": usage.free, "total_bytes": usage.total,
                       "used_percent": round(percent, 1)},
              "backlog": {"ready": ready, "rate_per_second": round(rate, 2),
                          "drain_seconds": 0.0 if not ready else (round(ready / rate, 1) if rate else None)},
              "recovery": last_recovery(config)}
    if db.capabilities.local_file:
        wal = Path(f"{db.path}-wal")
        backups = list_backups(config)
        report.update(path=str(db.path), synchronous=config.database_synchronous,
                      size_bytes=db.path.stat().st_size, wal_bytes=wal.stat().st_size if wal.exists() else 0,
                      free_fraction=round(free_page_fraction(db), 3), backups=len(backups),
                      last_backup=dict(backups[0].to_dict(), age_seconds=now - backups[0].created_at)
                      if backups else None)
    else:  # the server's WAL, checkpoints and backups are its own; show what it lets us see
        report.update(size_bytes=db.execute("SELECT pg_database_size(current_database())")[0][0],
                      server=db.execute("SHOW server_version")[0][0], backups=None, last_backup=None)
    return report
