"""Online backups, retention, restore, and recovery from a corrupt database at start-up.

A backup is made with SQLite's backup API while the daemon keeps writing, checked with
``integrity_check`` under a temporary name and only then renamed to ``oos-<UTC stamp>.db``
in the backup directory, so a file with that name is always a complete, checked copy.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from helpers.config import Config
from helpers.database_config import BACKUP_GLOB, _fsync_dir, check_file_integrity
from helpers.engine import Database
from helpers.wal import scan as scan_wal

PATTERN = BACKUP_GLOB
RECOVERY_FILE = "recovery.json"


@dataclass
class Backup:
    path: Path
    size: int
    created_at: float

    def to_dict(self) -> dict:
        return {"path": str(self.path), "name": self.path.name, "size": self.size, "created_at": self.created_at}


def list_backups(config: Config) -> list[Backup]:
    """Finished backups, newest first (temporary files of a backup in progress are not listed)."""
    if not config.backups_path.exists():
        return []
    found = []
    for path in config.backups_path.glob(PATTERN):
        try:
            st = path.stat()
        except FileNotFoundError:  # pruned by another process just now
            continue
        found.append(Backup(path, st.st_size, st.st_mtime))
    return sorted(found, key=lambda b: b.path.name, reverse=True)


def find_backup(config: Config, name: str | None = None) -> Path:
    """The backup called ``name`` in the backup directory (as ``oos backup list`` shows it),
    or the newest with no name. A name with a ``/`` is taken as a path. LookupError says
    "no such backup" when there is none."""
    if name is None:
        found = list_backups(config)
        if not found:
            raise LookupError(f"no backups in {config.backups_path}")
        return found[0].path
    path = Path(name) if "/" in name else config.backups_path / name
    if not path.is_file():
        raise LookupError(f"no such backup: {name} (`oos backup list` shows the backups in "
                          f"{config.backups_path})")
    return path


def create_backup(db: Database, config: Config) -> Backup:
    """Back up now, then apply retention. Raises RuntimeError if the copy fails its check."""
    path = db.create_backup(config.backups_path)
    prune_backups(config)
    return Backup(path, path.stat().st_size, path.stat().st_mtime)


def prune_backups(config: Config, now: float | None = None) -> list[Path]:
    """Keep the newest ``backup_keep`` backups and none older than ``backup_max_age_days``,
    but always the newest one. Also removes temporary files of interrupted backups."""
    now = time.time() if now is None else now
    removed = []
    for i, backup in enumerate(list_backups(config)):
        too_many = i >= config.backup_keep
        too_old = now - backup.created_at > config.backup_max_age_days * 86_400
        if i > 0 and (too_many or too_old):
            backup.path.unlink(missing_ok=True)
            removed.append(backup.path)
    if config.backups_path.exists():
        for leftover in config.backups_path.glob(f".{BACKUP_GLOB}.tmp*"):  # with their -journal
            if now - leftover.stat().st_mtime > 3600:
                leftover.unlink(missing_ok=True)
                removed.append(leftover)
    return removed


def restore(config: Config, backup: Path, reason: str = "before-restore") -> Path:
    """Replace the database with ``backup``; the current file is kept aside as
    ``oos.db.<reason>-<stamp>``. The caller makes sure nothing has the database open. Returns
    where the old file went. Raises ValueError if the backup is not sound.

    Crash-safe: the old file's WAL is checkpointed into it, the old file gets a second name
    (a hard link, so ``oos.db`` stays in place), and one atomic rename puts the checked copy
    at ``oos.db``. Killed at any point, ``oos.db`` is the old database or the new one."""
    backup = Path(backup)
    if not backup.is_file():
        raise LookupError(f"no such backup: {backup}")
    report = check_file_integrity(backup)
    if not report:
        raise ValueError(f"backup {backup}: fails its integrity check ({'; '.join(report.problems[:2])})")
    if not is_oos_database(backup):
        raise ValueError(f"backup {backup}: a sound SQLite file, but not an OOS database (no tasks table)")
    target = config.db_path
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.restore.tmp")
    shutil.copyfile(backup, tmp)
    os.chmod(tmp, 0o600)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    aside = target.with_name(f"{target.name}.{reason}-{_stamp()}")
    if target.exists():
        if check_file_integrity(target, quick=True):  # a sound old file: fold its WAL in first
            conn = sqlite3.connect(target)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                conn.close()
        os.link(target, aside)
    for suffix in ("-wal", "-shm"):  # the old WAL must never be applied to the restored file
        extra = target.with_name(target.name + suffix)
        if extra.exists():
            os.replace(extra, aside.with_name(aside.name + suffix))
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    return aside


def signs_of_earlier_data(config: Config) -> list[str]:
    """Backups and kept-aside files that show a database existed here before (for start-up:
    a missing ``oos.db`` beside them is a loss to report, not a first start)."""
    found = [b.path.name for b in list_backups(config)[:3]]
    if config.db_path.parent.exists():
        found += sorted(p.name for p in config.db_path.parent.glob(config.db_path.name + ".*-*")
                        if not p.name.endswith(("-wal", "-shm")))[:3]
    return found


def is_oos_database(path: Path) -> bool:
    conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tasks'").fetchone() is not None
    finally:
        conn.close()


def recover_if_corrupt(config: Config, log) -> dict | None:
    """At start-up, before anything opens the database:

    1. scan the WAL frame by frame (``helpers.wal``): damage SQLite would skip in silence is
       reported (critical log, /health) and the WAL is copied aside before SQLite drops it;
    2. check the file: ``quick_check``, or the full ``integrity_check`` after an unclean stop;
    3. if it is damaged, move it aside, restore the newest backup that passes its own check,
       and salvage from the damaged file every task it can still read that the backup lacks.

    Returns what was done (also written to ``<data_dir>/recovery.json`` for /health), or None
    if all was well. Raises RuntimeError if the file is damaged and no good backup exists."""
    path = config.db_path
    if not path.exists():
        return None
    event = None
    wal = scan_wal(path.with_name(path.name + "-wal"))
    if wal is not None and wal.damaged:
        kept = path.with_name(f"{path.name}-wal.damaged-{_stamp()}")
        shutil.copyfile(path.with_name(path.name + "-wal"), kept)
        event = {"at": time.time(), "kind": "wal", "problems": [wal.describe()], "kept": str(kept)}
        log.critical("the WAL is damaged", detail=wal.describe(), copy=str(kept))
    unclean = stopped_uncleanly(path)
    report = check_file_integrity(path, quick=not unclean)
    if report:
        if unclean:
            log.info("integrity_check after an unclean stop passed")
        if event:
            (config.data_dir / RECOVERY_FILE).write_text(json.dumps(event))
        return event
    log.critical("database is corrupt", path=str(path), problems=report.problems[:5], unclean_stop=unclean)
    for backup in list_backups(config):
        if not check_file_integrity(backup.path):
            log.error("skipping a damaged backup", backup=str(backup.path))
            continue
        aside = restore(config, backup.path, reason="corrupt")
        salvaged = salvage_tasks(aside, path)
        event = {"at": time.time(), "kind": "corrupt", "corrupt_file": str(aside), "backup": str(backup.path),
                 "backup_age_seconds": round(time.time() - backup.created_at, 1),
                 "problems": report.problems[:5] + (event["problems"] if event else []),
                 "salvaged_tasks": salvaged}
        (config.data_dir / RECOVERY_FILE).write_text(json.dumps(event))
        log.critical("database restored from backup", backup=str(backup.path), moved_aside=str(aside),
                     behind_seconds=event["backup_age_seconds"], salvaged_tasks=salvaged,
                     behind=f"{event['backup_age_seconds'] / 3600:.1f} h of changes lost, but for "
                            f"{salvaged} tasks read back from the damaged file")
        return event
    raise RuntimeError(f"{path} is corrupt ({'; '.join(report.problems[:2])}) and no good backup exists "
                       f"in {config.backups_path}")


def stopped_uncleanly(path: Path) -> bool:
    """True unless the daemon that beat last recorded a clean stop (or the file cannot tell)."""
    try:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT status FROM daemon_status ORDER BY updated_at DESC LIMIT 1").fetchone()
        finally:
            conn.close()
        return bool(row and json.loads(row[0]).get("running"))
    except (sqlite3.Error, ValueError):
        return True


def salvage_tasks(damaged: Path, restored: Path) -> int:
    """Copy into ``restored`` every task row of ``damaged`` that can still be read and that
    ``restored`` lacks (accepted after the backup). Rows that were running go back to the
    queue: their workers are gone. Returns how many were copied."""
    try:
        source = sqlite3.connect(f"file:{damaged.resolve()}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    target = sqlite3.connect(restored, isolation_level=None)
    try:
        start = target.execute("SELECT coalesce(max(id), 0) FROM tasks").fetchone()[0]
        columns = [r[1] for r in target.execute("PRAGMA table_info(tasks)")]
        rows = _readable_rows(source, columns, start)
        target.execute("BEGIN IMMEDIATE")
        for row in rows:
            values = dict(zip(columns, row))
            if values["state"] == "running":
                values.update(state="queued", worker=None, lease_until=None, attempts=max(0, values["attempts"] - 1))
            target.execute(f"INSERT OR IGNORE INTO tasks ({', '.join(columns)}) VALUES "
                           f"({', '.join('?' * len(columns))})", [values[c] for c in columns])
        target.execute("COMMIT")
        return len(rows)
    except sqlite3.Error:
        return 0
    finally:
        source.close()
        target.close()


def _readable_rows(source, columns: list[str], after: int, chunk: int = 256) -> list[tuple]:
    """Rows with id > ``after`` that SQLite can still read, in id order; a range that fails
    is read one id at a time, and ids whose page is damaged are skipped."""
    select = f"SELECT {', '.join(columns)} FROM tasks WHERE id BETWEEN ? AND ?"
    try:
        top, known = source.execute("SELECT max(id) FROM tasks").fetchone()[0] or after, True
    except sqlite3.Error:
        # The table's last page is unreadable: look further, range by range, until a run of
        # ranges gives nothing (one id at a time through a wholly damaged tree would take hours).
        top, known = after + 1_000_000, False
    rows: list[tuple] = []
    empty = 0
    for low in range(after + 1, top + 1, chunk):
        found = len(rows)
        try:
            rows += source.execute(select, (low, low + chunk - 1)).fetchall()
        except sqlite3.Error:
            for one in range(low, low + chunk):
                try:
                    rows += source.execute(select, (one, one)).fetchall()
                except sqlite3.Error:
                    continue
        empty = 0 if len(rows) > found else empty + 1
        if not known and empty >= 8:
            break
    return rows


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{time.time_ns() % 10**9:09d}"


def last_recovery(config: Config) -> dict | None:
    try:
        return json.loads((config.data_dir / RECOVERY_FILE).read_text())
    except (OSError, ValueError):
        return None


def free_page_fraction(db: Database) -> float:
    conn = db.pool.connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return free / pages if pages else 0.0


def vacuum_if_fragmented(db: Database, threshold: float = 0.25, log=None) -> bool:
    """VACUUM when more than ``threshold`` of the file is free pages. Returns True if it ran.
    Run at start-up (before workers) and daily; on a file of OOS's usual size it takes well
    under a second, and it waits for (never breaks) a running write."""
    fraction = free_page_fraction(db)
    if fraction <= threshold:
        return False
    before = db.path.stat().st_size
    try:
        conn = db.pool.connection()
        # OOS's connections do not sleep in SQLite's busy handler (busy_timeout 0): wait for a
        # running write the way they do, polling.
        db._retry_busy(conn.execute)("VACUUM")
        # In WAL mode VACUUM writes the new pages to the WAL; the file shrinks only when they
        # are checkpointed, so measure after that.
        db._retry_busy(lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())()
    except sqlite3.OperationalError as e:
        if log:
            log.warning("vacuum skipped", error=str(e))
        return False
    if log:
        log.info("vacuumed", free_fraction=round(fraction, 3), bytes_before=before, bytes_after=db.path.stat().st_size)
    return True
