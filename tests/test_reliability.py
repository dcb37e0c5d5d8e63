"""What a hostile audit broke (issue 15), each as a regression test on real files and processes."""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import backup as backups
from helpers.database_config import DatabaseManager
from helpers.queue_manager import QueueManager
from tests.daemon import ROOT, Daemon, wait_for

WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from helpers.config import load_config
    from helpers.database_config import DatabaseManager
    from helpers.queue_manager import QueueManager
    config = load_config(env={{"OOS_DATA_DIR": {data!r}}})
    q = QueueManager("load", DatabaseManager.from_config(config), config)
    print("writing", flush=True)
    while True:  # about 100 commits a second until killed
        q.enqueue("t", "x" * 200)
        time.sleep(0.01)
""")


def test_an_online_backup_finishes_under_steady_writes(db, config):
    q = QueueManager("load", db, config)
    for _ in range(45):  # about 45 MB
        q.enqueue_many([{"task": "t", "payload": "p" * 1000} for _ in range(1000)])
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), data=str(config.data_dir))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        before = db.execute("SELECT count(*) FROM tasks")[0][0]
        started = time.monotonic()
        made = backups.create_backup(db, config)
        took = time.monotonic() - started
        after = db.execute("SELECT count(*) FROM tasks")[0][0]
    finally:
        writer.kill()
        writer.wait(10)
    assert after > before, "the writer kept committing during the backup"
    copy = DatabaseManager(made.path)
    try:
        assert before <= copy.execute("SELECT count(*) FROM tasks")[0][0] <= after
    finally:
        copy.close()
    assert took < 120 and oct(made.path.stat().st_mode & 0o777) == "0o600"
    assert not list(config.backups_path.glob(".oos-*")), "no temporary file left"


def test_a_backup_past_its_time_limit_stops_and_leaves_nothing(db, config):
    QueueManager("q", db, config).enqueue_many([{"task": "t", "payload": "p" * 1000} for _ in range(20000)])
    with pytest.raises(RuntimeError, match="longer than"):
        db.create_backup(config.backups_path, time_limit=0.001)
    assert not list(config.backups_path.glob("*")) and not list(config.backups_path.glob(".*"))


def test_leftovers_of_killed_backups_are_pruned(db, config):
    backups.create_backup(db, config)
    old = time.time() - 7200
    for name in (".oos-20260101-000000-000000.db.tmp", ".oos-20260101-000000-000000.db.tmp-journal"):
        (config.backups_path / name).write_text("half")
        os.utime(config.backups_path / name, (old, old))
    removed = backups.prune_backups(config)
    assert len(removed) == 2 and not list(config.backups_path.glob(".oos-*"))


@pytest.mark.slow
def test_a_slow_task_in_a_batch_costs_the_rest_of_the_batch_nothing(data_dir, tmp_path, db, config):
    queue = QueueManager("default", db, config)
    specs = [{"task": "noop", "payload": {"n": i}, "timeout": 0.1} for i in range(70)]
    specs[40] = {"task": "naps", "payload": {"seconds": 16.5}, "timeout": 30}  # behind it: a batch of leases of 15.1 s
    ids = [e.id for e in queue.enqueue_many(specs)]
    d = Daemon(data_dir, tmp_path, env={"OOS_WORKERS_MIN": "1", "OOS_WORKERS_MAX": "1"}).start()
    try:
        wait_for(lambda: all(queue.get_task(i).state == "succeeded" for i in ids), 90, what="every task to succeed")
    finally:
        d.cleanup()
    runs = collections.Counter(line.split()[1] for line in (tmp_path / "executions.log").read_text().splitlines()
                               if line.startswith("noop"))
    assert set(runs.values()) == {1} and len(runs) == 69, "each quick task ran exactly once"
    tasks = [queue.get_task(i) for i in ids]
    assert all(t.attempts == 1 and not t.errors for t in tasks), [(t.id, t.errors) for t in tasks if t.errors][:3]
    assert any(e.get("event") == "slow task: rest of its batch given back" for e in d.logs())


@pytest.mark.slow
def test_a_worker_growing_mid_task_past_the_kill_limit_is_killed_and_the_attempt_counted(data_dir, tmp_path, db,
                                                                                          config):
    queue = QueueManager("default", db, config)
    task_id = queue.enqueue("hog", {"mb": 300, "seconds": 60}, timeout=120)
    d = Daemon(data_dir, tmp_path, env={"OOS_WORKERS_MAX_MEMORY_MB": "100",
                                        "OOS_WORKERS_KILL_MEMORY_MB": "200"}).start()
    try:
        task = wait_for(lambda: (t := queue.get_task(task_id)).attempts >= 1 and t.state != "running" and t, 60,
                        what="the hog to be stopped")
        assert "over workers.kill_memory_mb = 200" in task.last_error and task.errors[0]["attempt"] == 1
        assert [e for e in d.logs() if e.get("event") == "killing worker" and "kill_memory_mb" in e["reason"]]
        queue.cancel_task(task_id)
    finally:
        d.cleanup()


def test_a_breaker_trial_takes_healthy_work_before_poison_retries(db, config, clock):
    import random as _random

    from helpers import breaker as breakers

    queue = QueueManager("mixed", db, config, clock=clock, rng=_random.Random(3))
    poison = [queue.enqueue("poison", max_attempts=100) for _ in range(15)]
    for _ in poison:  # each failed once already: retries, due again after their backoff
        queue.fail_task(queue.dequeue("w").id, "w", "poison", handler=True)
    clock.advance(5)
    healthy = [queue.enqueue("healthy") for _ in range(10)]
    clock.advance(1)
    breaker = breakers.queue_breaker(db, "mixed", fail_max=1, reset_timeout=60)
    with pytest.raises(RuntimeError):
        breaker.call(_fail)
    opened = breakers.status(db, "mixed")["opened_at"]
    assert breakers.may_claim(breaker, now=opened + 61) == 1
    trial, = queue.dequeue_batch("w", 1, trial=True)
    assert trial.id in healthy, "the one trial goes to work that never failed"
    assert all(t.id in poison for t in queue.dequeue_batch("w", 2)), "outside trials, the usual order"


def _fail():
    raise RuntimeError("down")


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5])
def test_a_restore_killed_at_any_rename_leaves_a_database(db, config, subprocess_env, kill_at):
    from helpers.database_config import check_file_integrity

    queue = QueueManager("jobs", db, config)
    queue.enqueue("in-the-backup")
    made = backups.create_backup(db, config)
    queue.enqueue("after-the-backup")
    db.close()
    # strace kills the restore just before its kill_at-th rename (or link) runs.
    done = subprocess.run(["strace", "-f", "-o", "/dev/null", "-e", "trace=rename,link",
                           "-e", f"inject=rename,link:signal=KILL:when={kill_at}",
                           str(ROOT / ".venv" / "bin" / "oos"), "restore", made.path.name],
                          env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert config.db_path.exists(), f"no database after a restore killed at step {kill_at} ({done.returncode})"
    assert check_file_integrity(config.db_path)
    after = DatabaseManager(config.db_path)
    try:
        names = {r[0] for r in after.execute("SELECT name FROM tasks")}
    finally:
        after.close()
    assert names in ({"in-the-backup"}, {"in-the-backup", "after-the-backup"})


@pytest.mark.slow
def test_a_missing_database_beside_backups_is_refused_at_start(db, config, subprocess_env):
    QueueManager("jobs", db, config).enqueue("t")
    backups.create_backup(db, config)
    db.close()
    for suffix in ("", "-wal", "-shm"):
        config.db_path.with_name(config.db_path.name + suffix).unlink(missing_ok=True)
    env = dict(subprocess_env, OOS_API_ENABLED="false")
    done = subprocess.run([sys.executable, str(ROOT / "oos_service_manager.py")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 5 and not config.db_path.exists()
    assert "but oos-" in done.stderr and "oos restore" in done.stderr
    assert subprocess.run([str(ROOT / ".venv" / "bin" / "oos"), "restore"], env=env, timeout=60).returncode == 0
    assert config.db_path.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs of our own, to fill up for real (root only; CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path) -> None:
    with open(path, "wb", buffering=0) as f:  # unbuffered: nothing left over for close() to fail on
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


@pytest.mark.slow
def test_a_full_disk_degrades_and_recovers_by_itself(small_disk, tmp_path):
    import requests

    from tests.daemon import free_port

    data = small_disk / "data"
    port = free_port()
    d = Daemon(data, tmp_path, env={"OOS_API_ENABLED": "true", "OOS_API_PORT": str(port),
                                    "OOS_API_TOKEN": "t" * 32}).start()
    base, headers = f"http://127.0.0.1:{port}/api/v1", {"Authorization": "Bearer " + "t" * 32}
    try:
        workers_before = {p.pid for p in d.workers()}
        filler = small_disk / "filler"
        fill(filler)
        codes = set()
        for i in range(200):  # whatever the WAL still had room for, then: full
            answer = requests.post(f"{base}/queue/default/tasks", headers=headers,
                                   json={"task": "noop", "payload": {"n": i, "pad": "x" * 50_000}}, timeout=30)
            codes.add(answer.status_code)
            if answer.status_code == 507:
                assert "disk is full" in answer.json()["error"]["message"]
                break
        assert 507 in codes, codes
        time.sleep(3)  # several loop ticks and worker rounds on a full disk
        assert d.proc.poll() is None, "the daemon lives on"
        # Its status row may no longer be written: /health never says it is not running (while
        # the beat still finds room in the WAL, it reads running; once not, degraded).
        deadline = time.monotonic() + 13
        while time.monotonic() < deadline:
            detail = requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["checks"]["workers"]["detail"]
            assert detail.startswith("degraded: the disk is full") or " running, " in detail, detail
            time.sleep(0.5)
        assert {p.pid for p in d.workers()} == workers_before, "workers pause, they do not crash"
        filler.unlink()
        made = wait_for(lambda: (r := requests.post(f"{base}/queue/default/tasks", headers=headers,
                                                     json={"task": "noop", "payload": {"n": "after"}}, timeout=30))
                        .status_code == 201 and r.json()["ids"][0], 60, what="enqueues to work again")
        wait_for(lambda: requests.get(f"{base}/tasks/{made}", headers=headers, timeout=10).json()["state"]
                 == "succeeded", 60, what="the task after the recovery to run")
        fill(filler)
        assert d.stop(60) == 0, "SIGTERM still stops it"
        again = subprocess.Popen([sys.executable, str(ROOT / "oos_service_manager.py")], env=d.env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:  # it starts degraded if SQLite finds room; if not, it says why in one line and exits 5
            code = again.wait(20)
            err = again.stderr.read()
            # (its log may come first: the stop before could not be recorded on the full disk, so
            # start-up checks the file's integrity and says so)
            assert code == 5 and err.splitlines()[-1].startswith("oos: ") and "Traceback" not in err, (code, err[-2000:])
        except subprocess.TimeoutExpired:
            assert again.poll() is None
        finally:
            again.kill()
            again.wait(10)
    finally:
        d.cleanup()


@pytest.mark.slow
def test_a_worker_frozen_in_a_commit_is_killed_and_the_rest_goes_on(data_dir, tmp_path, db, config):
    d = Daemon(data_dir, tmp_path, env={"OOS_DATABASE_LOCK_HOLD_LIMIT": "3"}).start()
    try:
        queue = QueueManager("default", db, config)
        frozen = queue.enqueue("freeze_in_commit")
        began = time.monotonic()
        dead = wait_for(lambda: (t := queue.get_task(frozen)).state == "dead" and t, 60, what="the frozen worker's end")
        assert "held the database's write lock" in dead.last_error
        # The loop kept going (and reporting) while the lock was held: a STATUS at least every
        # 2.5 s (each tick's writes wait briefly for the lock, then give up), and not only at
        # the end. (How long the freeze lasts depends on when the manager first saw the holder:
        # 3.5 to 6.5 s here, so a count of statuses alone was a matter of timing.)
        statuses = [t for t, m in d.notify.messages if m.startswith("STATUS=") and t >= began]
        held_for = dead.finished_at - dead.started_at
        assert len(statuses) >= 2 and statuses[0] - began < 2.5, statuses
        assert all(b - a < 2.5 for a, b in zip(statuses, statuses[1:])), f"a gap in the loop's reports: {statuses}"
        assert held_for >= 3, "the worker was killed only after database.lock_hold_limit"
        after = queue.enqueue("noop", {"n": "after"})
        wait_for(lambda: queue.get_task(after).state == "succeeded", 30, what="work to go on")
        crashed = [e for e in d.logs() if e.get("event") == "worker exited" and e["exit_code"] not in (0, -9)]
        assert crashed == [], "the other worker waited out the lock instead of crashing"
    finally:
        d.cleanup()


# -- 11. idle and slow clients ---------------------------------------------------------------

@pytest.mark.slow
def test_health_answers_with_300_idle_and_slow_connections_open(data_dir, tmp_path):
    import socket

    import requests

    from tests.daemon import free_port

    port = free_port()
    d = Daemon(data_dir, tmp_path, env={"OOS_API_ENABLED": "true", "OOS_API_PORT": str(port)}).start()
    hogs = []
    try:
        for i in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers that never end
            hogs.append(s)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        for s in hogs:
            s.close()
        d.cleanup()


# -- 12. smaller -----------------------------------------------------------------------------

def test_hostile_inputs_get_clear_4xx_answers(config, db):
    from api.app import create_app

    client = create_app(config).test_client()
    headers = {"Authorization": "Bearer " + client.application.extensions["oos"]["token"],
               "Content-Type": "application/json"}
    deep = client.post("/api/v1/queue/jobs/tasks", data="[" * 5000 + "]" * 5000, headers=headers)
    assert deep.status_code == 400 and deep.json["error"]["field"] == "body"
    too_big = client.post("/api/v1/queue/jobs/tasks", data=b"x" * (config.api_max_request_bytes + 10), headers=headers)
    assert too_big.status_code == 413 and too_big.json["error"]["code"] == 413
    wrong_method = client.put("/api/v1/queue/status", headers=headers)
    assert wrong_method.status_code == 405 and "GET" in wrong_method.headers["Allow"]
    digits = client.get("/api/v1/tasks/" + "9" * 5000, headers=headers)
    assert digits.status_code in (400, 404) and "sys.set_int_max_str_digits" not in digits.get_data(as_text=True)
    nul = client.post("/api/v1/queue/jobs/tasks", json={"task": "a\x00b"}, headers=headers)
    assert nul.status_code in (400, 422) and nul.json["error"]["field"] == "task"
    tiny = client.post("/api/v1/queue/jobs/tasks", json={"task": "t", "timeout": 1e-300}, headers=headers)
    assert tiny.status_code == 422 and tiny.json["error"]["field"] == "timeout"
    assert db.execute("SELECT count(*) FROM tasks")[0][0] == 0
    spec = client.get("/api/v1/openapi.json").json
    post = spec["paths"]["/api/v1/queue/{name}/tasks"]["post"]
    assert "400" in post["responses"] and post["parameters"][0]["schema"]["pattern"] == "^[A-Za-z0-9_.:-]{1,100}$"


def test_a_damaged_row_is_reported_as_such(config, db):
    from api.app import create_app

    task_id = QueueManager("jobs", db, config).enqueue("t")
    db.execute("UPDATE tasks SET payload = CAST(x'ff22' AS TEXT) WHERE id = ?", (task_id,))
    client = create_app(config).test_client()
    headers = {"Authorization": "Bearer " + client.application.extensions["oos"]["token"]}
    answer = client.get(f"/api/v1/tasks/{task_id}", headers=headers)
    assert "damaged" in answer.json["error"]["message"] and "unavailable" not in answer.json["error"]["message"]


def test_results_are_capped_like_payloads(db, config):
    queue = QueueManager("jobs", db, config.replace(queue_max_payload_bytes=1000))
    task_id = queue.enqueue("t")
    queue.complete_task(queue.dequeue("w").id, "w", "x" * 5000)
    assert "not stored" in queue.get_task(task_id).result["oos_error"]


@pytest.mark.slow
def test_the_database_its_wal_and_backups_are_private(data_dir, tmp_path, subprocess_env):
    d = Daemon(data_dir, tmp_path).start()
    try:
        assert subprocess.run([str(ROOT / ".venv" / "bin" / "oos"), "backup"], env=subprocess_env,
                              timeout=60).returncode == 0
        for path in (data_dir / "oos.db", data_dir / "oos.db-wal", next((data_dir / "backups").glob("oos-*.db"))):
            assert path.stat().st_mode & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"
        assert (data_dir / "backups").stat().st_mode & 0o077 == 0
    finally:
        d.cleanup()


# -- 10. damage quick_check cannot see ----------------------------------------------------------

KILLED_WRITER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from helpers.config import load_config
    from helpers.database_config import DatabaseManager
    from helpers.queue_manager import QueueManager
    config = load_config(env={{"OOS_DATA_DIR": {data!r}, "OOS_DATABASE_WAL_AUTOCHECKPOINT": "0"}})
    q = QueueManager("jobs", DatabaseManager.from_config(config), config)
    for i in range({count}):
        q.enqueue("t", {{"n": i}})  # one commit each, all of them in the WAL
    os._exit(0)  # no close: the WAL stays as it is, as after a crash
""")


def write_and_die(config, count: int) -> None:
    subprocess.run([sys.executable, "-c", KILLED_WRITER.format(root=str(ROOT), data=str(config.data_dir), count=count)],
                   check=True, timeout=120)


class Log:
    def __init__(self):
        self.events = []

    def __getattr__(self, level):
        return lambda event, **kw: self.events.append((level, event, kw))


def test_a_bit_flip_in_the_middle_of_the_wal_is_reported_not_passed_over(config):
    from helpers import wal

    write_and_die(config, 300)
    wal_path = config.db_path.with_name("oos.db-wal")
    clean = wal.scan(wal_path)
    assert clean.frames > 300 and not clean.damaged
    with open(wal_path, "r+b") as f:  # one bit, in the page of a frame a third of the way in
        at = 32 + (clean.frames // 3) * (24 + clean.page_size) + 24 + 100
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
    report = wal.scan(wal_path)
    assert report.damaged and report.lost_commits > 100 and report.valid < clean.valid
    log = Log()
    event = backups.recover_if_corrupt(config, log)
    assert event["kind"] == "wal" and ("critical", "the WAL is damaged") in [e[:2] for e in log.events]
    assert (config.data_dir / event["kept"].split("/")[-1]).exists(), "the damaged WAL is kept for forensics"
    from helpers import reports
    healthy, checks = reports.health(DatabaseManager.from_config(config), config)
    assert checks["recovery"]["status"] == "warn" and "committed transactions" in checks["recovery"]["detail"]


def test_a_wal_with_a_torn_uncommitted_tail_is_not_called_damaged(config):
    from helpers import wal

    write_and_die(config, 50)
    wal_path = config.db_path.with_name("oos.db-wal")
    size = wal_path.stat().st_size
    with open(wal_path, "r+b") as f:  # a crash in the middle of writing one more frame
        f.truncate(size + 24 + 1000)
    assert not wal.scan(wal_path).damaged


def test_after_an_unclean_stop_the_full_integrity_check_runs(config, db):
    db.execute("INSERT INTO daemon_status (daemon, host, pid, started_at, updated_at, status) "
               "VALUES ('h:1', 'h', 1, 0, 0, ?)", ('{"running": true}',))
    db.close()
    log = Log()
    assert backups.recover_if_corrupt(config, log) is None
    assert ("info", "integrity_check after an unclean stop passed") in [e[:2] for e in log.events]


def test_recovery_salvages_the_tasks_a_backup_lacks(db, config):
    queue = QueueManager("jobs", db, config)
    queue.enqueue_many([{"task": "old", "payload": i} for i in range(1000)])
    backups.create_backup(db, config)
    queue.enqueue_many([{"task": "new", "payload": "x" * 300} for i in range(3000)])
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    pages = config.db_path.stat().st_size // 4096
    with open(config.db_path, "r+b") as f:  # garbage over a few pages in the middle of the new rows
        f.seek(int(pages * 0.7) * 4096)
        f.write(os.urandom(3 * 4096))
    event = backups.recover_if_corrupt(config, Log())
    assert event["kind"] == "corrupt" and event["salvaged_tasks"] > 2000
    restored = DatabaseManager(config.db_path)
    try:
        names = dict(restored.execute("SELECT name, count(*) FROM tasks GROUP BY name"))
    finally:
        restored.close()
    assert names["old"] == 1000 and names["new"] == event["salvaged_tasks"] < 3000 + 1


def test_health_says_a_silent_daemon_on_a_full_disk_is_degraded_not_stopped(small_disk):
    """The daemon's status row is stale (its writes fail for want of space) while it runs:
    /health's workers check says the disk is full, not that the daemon is not running."""
    from helpers import reports
    from helpers.config import load_config
    from helpers.process import hold_database

    config = load_config(env={"OOS_DATA_DIR": str(small_disk / "data")})
    db = DatabaseManager.from_config(config)
    try:
        db.execute("INSERT INTO daemon_status (daemon, host, pid, started_at, updated_at, status) "
                   "VALUES ('h:1', 'h', 1, 0, 0, ?)", ('{"running": true}',))
        lock = hold_database(config)  # this process stands for the running daemon
        try:
            assert reports.workers_check(db, config)["detail"].startswith("the daemon (pid")
            fill(small_disk / "filler")
            check = reports.workers_check(db, config)
            assert check["status"] == "fail" and check["detail"].startswith("degraded: the disk is full"), check
        finally:
            lock.close()
        assert reports.workers_check(db, config)["detail"] == "the daemon is not running"
    finally:
        db.close()
