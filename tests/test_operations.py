"""Backups under load, retention, restore, corruption recovery, vacuum, the unit's hardening."""
from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests

from helpers import backup as backups
from helpers.config import load_config
from helpers.database_config import DatabaseManager, check_file_integrity
from helpers.exit_codes import DATABASE as RET_DATABASE
from helpers.queue_manager import QueueManager
from tests.daemon import ROOT, Daemon, free_port, wait_for

ENQUEUE_FOREVER = r"""
from helpers.queue_manager import get_queue_manager
queue = get_queue_manager("load")
while True:
    queue.enqueue_many([{"task": "t", "payload": {"blob": "x" * 200}}] * 20)
"""


def test_backup_while_enqueueing_and_claiming_is_consistent_and_restorable(db, config, subprocess_env, tmp_path):
    producer = subprocess.Popen([sys.executable, "-c", ENQUEUE_FOREVER], env=subprocess_env)
    queue = QueueManager("load", db, config)
    stop = threading.Event()

    def consume():
        while not stop.is_set():
            tasks = queue.dequeue_batch("c", 20)
            queue.complete_many([(t.id, None) for t in tasks], "c")

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        wait_for(lambda: db.execute("SELECT count(*) FROM tasks")[0][0] > 2000, 60, what="load")
        made = [backups.create_backup(db, config) for _ in range(3)]
    finally:
        stop.set()
        consumer.join(30)
        producer.kill()
        producer.wait(10)
    for b in made:
        assert check_file_integrity(b.path)
        copy = sqlite3.connect(b.path)
        states = dict(copy.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())
        enqueued = copy.execute("SELECT enqueued FROM queues WHERE name = 'load'").fetchone()[0]
        copy.close()
        assert sum(states.values()) == enqueued, "counters and rows agree: one consistent snapshot"
    # Restore the newest into a fresh data directory and keep working there.
    other = load_config(env={"OOS_DATA_DIR": str(tmp_path / "restored")})
    backups.restore(other, made[-1].path)
    restored = DatabaseManager.from_config(other)
    copy = sqlite3.connect(made[-1].path)
    in_backup = copy.execute("SELECT count(*) FROM tasks WHERE state = 'queued'").fetchone()[0]
    copy.close()
    q = QueueManager("load", restored, other)
    assert q.stats()["counts"]["queued"] == in_backup
    drained = 0
    while tasks := q.dequeue_batch("w", 500):  # the restored file takes claims and writes
        drained += sum(q.complete_many([(t.id, None) for t in tasks], "w"))
    assert drained == in_backup
    restored.close()


def test_retention_by_count_and_age(db, config):
    config = config.replace(backup_keep=3, backup_max_age_days=1)
    made = [backups.create_backup(db, config) for _ in range(5)]
    names = [b.path.name for b in backups.list_backups(config)]
    assert names == sorted([m.path.name for m in made], reverse=True)[:3]
    assert backups.prune_backups(config, now=time.time() + 2 * 86_400) and len(backups.list_backups(config)) == 1


def test_the_health_check_names_the_newest_backup(db, config):
    from helpers.reports import last_backup_check
    assert last_backup_check(db, config) == {"status": "warn", "detail": "no backup yet"}
    made = [backups.create_backup(db, config) for _ in range(2)]
    check = last_backup_check(db, config)
    assert check["status"] == "ok" and check["detail"].startswith(f"{made[-1].path.name}, 0.0 h old"), check


def test_restore_keeps_the_current_file_aside(db, config):
    queue = QueueManager("q", db, config)
    first = queue.enqueue("t", 1)
    snapshot = backups.create_backup(db, config)
    queue.enqueue("t", 2)
    db.close()
    aside = backups.restore(config, snapshot.path)
    assert aside.exists() and check_file_integrity(aside)
    fresh = DatabaseManager.from_config(config)
    assert [r[0] for r in fresh.execute("SELECT id FROM tasks")] == [first]
    fresh.close()
    bad = config.backups_path / "oos-broken.db"
    bad.write_bytes(b"garbage" * 1000)
    with pytest.raises(ValueError, match="fails its integrity check"):
        backups.restore(config, bad)


def damage(path):
    """Overwrite pages in the middle of the file, as a bad disk would."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    for start in range(2 * page, len(data) - page, 3 * page):
        data[start:start + page] = b"\xde\xad\xbe\xef" * (page // 4)
    path.write_bytes(bytes(data))


def test_a_corrupt_database_is_restored_at_start_and_reported(data_dir, tmp_path, config):
    db = DatabaseManager.from_config(config)
    queue = QueueManager("default", db, config)
    kept = [e.id for e in queue.enqueue_many([{"task": "noop", "payload": {"n": i, "pad": "x" * 500}}
                                              for i in range(300)])]
    backups.create_backup(db, config)
    queue.enqueue_many([{"task": "noop", "payload": {"n": i, "pad": "y" * 500}} for i in range(300)])
    db.close()
    damage(config.db_path)
    assert not check_file_integrity(config.db_path, quick=True)

    port = free_port()
    d = Daemon(data_dir, tmp_path, env={"OOS_API_ENABLED": "true", "OOS_API_PORT": str(port)})
    try:
        d.start()
        events = [e for e in d.logs() if e.get("level") == "critical"]
        assert any(e["event"] == "database is corrupt" for e in events)
        restored = next(e for e in events if e["event"] == "database restored from backup")
        assert "h of changes lost" in restored["behind"]
        assert list(data_dir.glob("oos.db.corrupt-*"))
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
        assert health["checks"]["recovery"]["status"] == "warn"
        assert "restored from" in health["checks"]["recovery"]["detail"]
        fresh = DatabaseManager.from_config(config)
        wait_for(lambda: fresh.execute("SELECT count(*) FROM tasks WHERE state = 'succeeded'")[0][0] == 300, 60,
                 what="the restored tasks to run")
        assert sorted(r[0] for r in fresh.execute("SELECT id FROM tasks")) == kept
        fresh.close()
    finally:
        d.cleanup()


def test_a_corrupt_database_without_backup_stops_with_a_named_code(config, subprocess_env):
    db = DatabaseManager.from_config(config)
    QueueManager("q", db, config).enqueue_many([{"task": "t", "payload": "x" * 500}] * 300)
    db.close()
    damage(config.db_path)
    done = subprocess.run([sys.executable, str(ROOT / "oos_service_manager.py")], env=subprocess_env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == RET_DATABASE
    assert "no good backup exists" in done.stderr


def test_vacuum_when_a_quarter_is_free(db, config):
    queue = QueueManager("q", db, config)
    queue.enqueue_many([{"task": "t", "payload": "x" * 2000} for _ in range(2000)])
    db.execute("DELETE FROM tasks")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert backups.free_page_fraction(db) > 0.25
    before = config.db_path.stat().st_size
    assert backups.vacuum_if_fragmented(db)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert config.db_path.stat().st_size < before / 4
    assert not backups.vacuum_if_fragmented(db)


def test_disk_cleanup_above_the_threshold(db, config):
    from helpers.resource_manager import ResourceManager

    for _ in range(3):
        backups.create_backup(db, config)
    config = config.replace(resources_disk_high_percent=0.0, backup_keep=1)
    report = ResourceManager(config).cleanup_disk_space(config.data_dir, db)
    assert report["backups_removed"] == 2 and len(backups.list_backups(config)) == 1


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_unit_scores_at_most_1_0_offline():
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(ROOT / "systemd" / "oos.service")],
                          capture_output=True, text=True, timeout=60)
    line = [x for x in done.stdout.splitlines() if "Overall exposure level" in x][0]
    assert float(line.split(":")[1].split()[0]) <= 1.0, line
