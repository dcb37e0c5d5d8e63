"""What a new user found (bugs, surprising defaults, CLI consistency), each as a regression test."""
from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler

import psutil
import pytest
import requests

from api.app import create_app
from helpers import backup as backups
from helpers.config import load_config
from helpers.database_config import DatabaseManager
from helpers.queue_manager import QueueManager, get_queue_manager
from helpers.resource_manager import ResourceManager
from helpers.validation import InvalidField
from tests.daemon import ROOT, Daemon, free_port, wait_for
from tests.fake_remotes import QuietHTTPServer

OOS = str(ROOT / ".venv" / "bin" / "oos")
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def oos(env, *args, **kwargs):
    return subprocess.run([OOS, *args], env=env, capture_output=True, text=True, timeout=60, **kwargs)


def api_daemon(data_dir, tmp_path, **env):
    port = free_port()
    d = Daemon(data_dir, tmp_path, env={"OOS_API_ENABLED": "true", "OOS_API_PORT": str(port),
                                        "OOS_API_TOKEN": "t" * 32, **env})
    d.base = f"http://127.0.0.1:{port}"
    return d


# -- 1. another server on the API's port ------------------------------------------------------

class Answering(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_a_port_answered_by_another_http_server_stops_the_daemon_with_exit_7(data_dir, tmp_path):
    other = QuietHTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    daemon = Daemon(data_dir, tmp_path, env={"OOS_API_ENABLED": "true", "OOS_API_PORT": str(other.server_port)})
    try:
        daemon.start(wait_ready=False)
        assert daemon.proc.wait(120) == 7
        assert "READY=1" not in daemon.notify.lines(), "another server's answer is not our API's"
        stopped = [e for e in daemon.logs() if e.get("event") == "stopping the daemon"]
        assert stopped and "taken" in stopped[0]["reason"] and "another server answers" in stopped[0]["reason"]
        assert "\n" not in stopped[0]["reason"]
    finally:
        daemon.cleanup()
        other.shutdown()


# -- 2, 3. restore --------------------------------------------------------------------------

@pytest.mark.slow
def test_restore_is_refused_while_the_daemon_runs_and_nothing_accepted_is_lost(data_dir, tmp_path, subprocess_env):
    daemon = api_daemon(data_dir, tmp_path).start()
    try:
        assert oos(subprocess_env, "backup").returncode == 0
        refused = oos(subprocess_env, "restore")
        assert refused.returncode == 1
        assert "is running on" in refused.stderr and "stop it first" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        accepted = requests.post(f"{daemon.base}/api/v1/queue/default/tasks", json={"task": "noop"},
                                 headers={"Authorization": "Bearer " + "t" * 32}, timeout=10)
        assert accepted.status_code == 201
        task_id = accepted.json()["ids"][0]
        db = DatabaseManager.from_config(load_config(env=subprocess_env))
        wait_for(lambda: db.execute("SELECT state FROM tasks WHERE id = ?", (task_id,))[0][0] == "succeeded", 30,
                 what="the task accepted after the refused restore to run")
        db.close()
    finally:
        daemon.cleanup()
    assert oos(subprocess_env, "restore").returncode == 0, "stopped, the restore goes ahead"


def test_restore_takes_a_name_from_backup_list_from_any_directory(db, config, subprocess_env, tmp_path):
    QueueManager("jobs", db, config).enqueue("noop")
    made = backups.create_backup(db, config)
    db.close()
    listed = json.loads(oos(subprocess_env, "--json", "backup", "list").stdout)
    assert listed[0]["name"] == made.path.name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = oos(subprocess_env, "restore", made.path.name, cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    missing = oos(subprocess_env, "restore", "oos-19700101-000000-000000.db", cwd=elsewhere)
    assert missing.returncode == 1 and "no such backup: oos-19700101-000000-000000.db" in missing.stderr
    assert "integrity" not in missing.stderr


def test_restore_refuses_a_sqlite_file_that_is_not_an_oos_database(config, subprocess_env, db):
    import sqlite3
    other = config.data_dir / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    done = oos(subprocess_env, "restore", str(other))
    assert done.returncode == 1 and "not an OOS database" in done.stderr


# -- 4. per-task timeout, and @task defaults however a task is enqueued ------------------------

def test_a_per_task_timeout_wins_over_the_handler_and_the_record_says_so(queue):
    import tests.tasks.sample  # noqa: F401 - registers "naps" with timeout=0.5

    longer = queue.get_task(queue.enqueue("naps", {"seconds": 1}, timeout=5))
    default = queue.get_task(queue.enqueue("naps", {"seconds": 1}))
    assert longer.timeout == 5.0 and default.timeout == 0.5


@pytest.mark.slow
def test_handler_defaults_and_per_task_timeouts_over_http_cli_and_the_daemon(data_dir, tmp_path, subprocess_env):
    daemon = api_daemon(data_dir, tmp_path).start()
    headers = {"Authorization": "Bearer " + "t" * 32}
    try:
        over_http = requests.post(f"{daemon.base}/api/v1/queue/default/tasks", headers=headers,
                                  json=[{"task": "naps", "payload": {"seconds": 1.5}, "timeout": 10},
                                        {"task": "too_slow"}], timeout=10).json()["ids"]
        env = dict(subprocess_env, OOS_TASK_MODULES="tests.tasks.sample")
        by_cli = int(oos(env, "enqueue", "default", "too_slow").stdout)
        get = lambda i: requests.get(f"{daemon.base}/api/v1/tasks/{i}", headers=headers, timeout=10).json()  # noqa: E731
        assert get(over_http[1])["max_attempts"] == 2 and get(over_http[1])["timeout"] == 0.5
        assert get(by_cli)["max_attempts"] == 2 and get(by_cli)["timeout"] == 0.5
        done = wait_for(lambda: get(over_http[0])["state"] in ("succeeded", "dead") and get(over_http[0]), 60,
                        what="the long nap to finish")
        assert done["state"] == "succeeded" and done["timeout"] == 10.0 and done["attempts"] == 1
    finally:
        daemon.cleanup()


# -- 5. the seed's calls read the configuration --------------------------------------------

def test_resource_manager_and_database_manager_read_the_configuration(monkeypatch, tmp_path):
    monkeypatch.setenv("OOS_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("OOS_WORKERS_MAX", "7")
    assert ResourceManager().config.workers_max == 7
    db = DatabaseManager()
    try:
        assert db.path == tmp_path / "d" / "oos.db" and db.path.exists()
        assert db.backup_dir == tmp_path / "d" / "backups"
    finally:
        db.close()


# -- 6. a closed pipe ----------------------------------------------------------------------

def test_a_reader_that_goes_away_is_not_an_error(subprocess_env, db, config):
    task_id = QueueManager("jobs", db, config).enqueue("noop", {"x": "y" * 1000})
    proc = subprocess.Popen([OOS, "task", str(task_id)], env=subprocess_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head -1` gone before we write
    assert proc.wait(60) == 0
    assert proc.stderr.read() == b""


# -- 7. the vacuum's log line ------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.events = []

    def info(self, event, **kw):
        self.events.append((event, kw))

    warning = info


def test_vacuumed_reports_the_size_after_the_vacuum(db, config):
    q = QueueManager("q", db, config)
    q.enqueue_many([{"task": "t", "payload": "x" * 2000} for _ in range(2000)])
    db.execute("DELETE FROM tasks")
    db.checkpoint()
    log = Recorder()
    assert backups.vacuum_if_fragmented(db, log=log)
    (event, kw), = log.events
    assert event == "vacuumed" and kw["bytes_after"] == db.path.stat().st_size < kw["bytes_before"] / 4


# -- 8. nothing but log lines on stderr ----------------------------------------------------

def test_the_openapi_document_is_built_without_warnings(config):
    with warnings.catch_warnings(record=True) as caught:  # the process's own filters stay
        assert create_app(config).test_client().get("/api/v1/openapi.json").status_code == 200
    assert [str(w.message) for w in caught] == []


def test_log_lines_are_json_under_a_pipe_and_readable_on_a_terminal(tmp_path):
    program = textwrap.dedent("""
        import warnings
        from helpers import log
        log.configure("info", process="t")
        log.get_logger().info("hello there", n=1)
        warnings.warn("a library speaks")
        import logging
        logging.getLogger("urllib3.connectionpool").warning("Retrying %s", "(1)")
        logging.getLogger("urllib3.connectionpool").debug("below the level")
        logging.getLogger("waitress.queue").warning("Task queue depth is 1")  # all threads busy: every request
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OOS_LOG_FORMAT", None)
    piped = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in piped.stderr.splitlines()]
    assert [e["event"] for e in lines] == ["hello there", "python warning", "Retrying (1)"]
    assert lines[-1]["logger"] == "urllib3.connectionpool" and lines[-1]["level"] == "warning"
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", program], env=env, stderr=secondary, stdout=subprocess.DEVNULL)
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(60)
    os.close(primary)
    text = out.decode()
    assert "hello there" in text and "n=1" in text and not text.lstrip().startswith("{")


def test_processes_sharing_one_stderr_never_splice_their_log_lines():
    # The daemon's manager, workers and API write to one stderr (journald's socket, a pipe).
    # With unbuffered stdio (PYTHONUNBUFFERED=1, common in containers) each line went out as
    # two writes, the line then its newline, and 8-18% of the lines read back as '{...}{...}'
    # or blank.
    program = textwrap.dedent("""
        from helpers import log
        log.configure("info", process="p")
        for i in range(2000):
            log.get_logger().info("a line", i=i, pad="x" * 200)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OOS_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    read_end, write_end = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", program], env=env, stderr=write_end) for _ in range(4)]
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            lines = pipe.read().decode().splitlines()
    finally:
        for proc in procs:
            proc.wait(60)
    assert len(lines) == 4 * 2000
    assert sorted(json.loads(line)["i"] for line in lines) == sorted(list(range(2000)) * 4)


def test_a_handlers_print_reaches_the_daemons_stdout_at_once_and_at_the_end(data_dir, tmp_path, config):
    # Under systemd stdout is journald's socket, not a terminal, and PYTHONUNBUFFERED is unset:
    # a handler's print() sat in the worker's 8 KiB buffer, and os._exit dropped it at the end.
    d = Daemon(data_dir, tmp_path)
    d.env.pop("PYTHONUNBUFFERED", None)
    d.start()
    try:
        q = QueueManager("default", DatabaseManager.from_config(config), config)
        q.enqueue("says", {"line": "a line from a handler", "tail": "and one with no newline"})
        wait_for(lambda: "a line from a handler" in d.log_path.read_text(), 30, what="the handler's line")
        assert d.stop() == 0
        assert "and one with no newline" in d.log_path.read_text()
    finally:
        d.cleanup()


# -- 9. SIGTTOU stops an idle worker; the reason shown is fresh ------------------------------

@pytest.mark.slow
def test_sigttou_stops_an_idle_worker_and_the_reason_says_why(data_dir, tmp_path, config, subprocess_env):
    d = Daemon(data_dir, tmp_path, env={"OOS_WORKERS_MIN": "2", "OOS_WORKERS_SCALE_DOWN_COOLDOWN": "600"}).start()
    try:
        wait_for(lambda: len(d.workers()) == 2, 30, what="two workers")
        q = QueueManager("default", DatabaseManager.from_config(config), config)
        task_id = q.enqueue("sleepy", {"seconds": 20})
        busy = wait_for(lambda: (t := q.get_task(task_id)).state == "running" and t.worker, 30, what="the task to start")
        busy_pid = int(busy.rpartition(":")[2])
        d.signal(signal.SIGTTIN)
        wait_for(lambda: len(d.workers()) == 3, 30, what="a third worker")
        status = wait_for(lambda: (s := json.loads(oos(subprocess_env, "--json", "workers").stdout))["last_scaling"]
                          and "SIGTTIN" in s["last_scaling"]["reason"] and s, 15, what="a fresh reason")
        assert status["workers_desired"] == 3
        for count in (1, 2):  # one at a time: two pending SIGTTOUs would merge into one
            d.signal(signal.SIGTTOU)
            wait_for(lambda n=count: len([e for e in d.logs() if e.get("event") == "stopping worker"]) == n, 30,
                     what=f"{count} workers to be stopped")
        stopped = [e["pid"] for e in d.logs() if e.get("event") == "stopping worker"]
        assert busy_pid not in stopped, "the busy worker keeps its task"
        assert psutil.pid_exists(busy_pid) and q.get_task(task_id).state == "running"
    finally:
        d.cleanup()


# -- 10. a test killed mid-run takes its daemon with it --------------------------------------

@pytest.mark.slow
def test_a_daemon_started_by_a_killed_test_process_dies_with_it(data_dir, tmp_path):
    program = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from tests.daemon import Daemon
        d = Daemon(Path({str(data_dir)!r}), Path({str(tmp_path)!r})).start()
        print(d.proc.pid, flush=True)
        time.sleep(600)
    """)
    runner = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        daemon_pid = int(runner.stdout.readline())
        assert psutil.pid_exists(daemon_pid)
        runner.kill()  # like pytest killed by a CI timeout
        runner.wait(10)
        wait_for(lambda: not psutil.pid_exists(daemon_pid) or psutil.Process(daemon_pid).status() == psutil.STATUS_ZOMBIE,
                 30, what="the daemon to die with its test")
    finally:
        runner.kill()
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- defaults that surprised ------------------------------------------------------------------

def test_two_workers_by_default_and_running_work_counts_for_scaling():
    config = load_config(env={})
    assert config.workers_min == 2
    policy = ResourceManager(load_config(env={}, workers_min=1), probe=lambda: (10.0, 0.0))
    assert policy.decide(1, ready=1, running=1).target == 2, "a busy worker with work waiting adds one"
    assert policy.decide(1, ready=0, running=1).target == 1


@pytest.mark.slow
def test_one_long_task_does_not_hold_up_another_queue(data_dir, tmp_path, config):
    d = Daemon(data_dir, tmp_path, env={"OOS_WORKERS_MIN": "1"}).start()
    try:
        db = DatabaseManager.from_config(config)
        slow = QueueManager("default", db, config).enqueue("sleepy", {"seconds": 40})
        wait_for(lambda: QueueManager("default", db, config).get_task(slow).state == "running", 30)
        quick = QueueManager("echo", db, config).enqueue("echo", {"hi": 1})
        done = wait_for(lambda: (t := QueueManager("echo", db, config).get_task(quick)).state == "succeeded" and t,
                        30, what="the quick task while the long one runs")
        assert done.result == {"hi": 1}
    finally:
        d.cleanup()


@pytest.mark.slow
def test_tasks_of_a_queue_this_daemon_does_not_serve_wait_for_one_that_does(data_dir, tmp_path, config, subprocess_env):
    d = Daemon(data_dir, tmp_path).start()
    try:
        queue = get_queue_manager("my_queue", config)  # the README's example: no handler here
        task_id = queue.enqueue("process_data", {"file": "data.csv"})
        known = QueueManager("default", queue.db, config).enqueue("no_such_handler")
        wait_for(lambda: queue.get_task(known).state == "dead", 30, what="an unknown task of a served queue")
        time.sleep(1.5)  # a few claim rounds of both workers
        assert queue.get_task(task_id).state == "queued" and queue.get_task(task_id).attempts == 0
        shown = oos(subprocess_env, "status").stdout
        assert re.search(r"my_queue .* no \(no worker\)", shown), shown
        assert queue.dequeue("worker_1").id == task_id, "a client of its own still gets it"
    finally:
        d.cleanup()


def test_the_cli_names_its_database_and_never_creates_one(subprocess_env, db, config, tmp_path):
    first = oos(subprocess_env, "status").stdout.splitlines()[0]
    assert first == f"database: {config.db_path}"
    typo = dict(subprocess_env, OOS_DATA_DIR=str(tmp_path / "dta"))
    for args in (["status"], ["enqueue", "q", "t"], ["token"], ["dlq", "list"]):
        done = oos(typo, *args)
        assert done.returncode == 1 and f"no database at {tmp_path / 'dta' / 'oos.db'}" in done.stderr
    assert not (tmp_path / "dta").exists()


# -- CLI consistency -------------------------------------------------------------------------

def test_cli_options_ids_and_errors_are_consistent(subprocess_env, db, config):
    env = subprocess_env
    jobs, mail = QueueManager("jobs", db, config), QueueManager("mail", db, config)
    dead = [q.enqueue("t") for q in (jobs, mail)]
    for q in (jobs, mail):
        q.fail_task(q.dequeue("w").id, "w", "boom", retry=False)
    alive = jobs.enqueue("t")
    after, before = json.loads(oos(env, "status", "--json").stdout), json.loads(oos(env, "--json", "status").stdout)
    assert [q["counts"] for q in after["queues"]] == [q["counts"] for q in before["queues"]]
    listed = json.loads(oos(env, "dlq", "list", "--json").stdout)
    assert listed["total"] == 2 and {t["queue"] for t in listed["items"]} == {"jobs", "mail"}
    for verb in ("show", "retry", "purge"):
        done = oos(env, "dlq", verb, str(alive))
        assert done.returncode == 1 and f"task {alive} is queued, not dead" in done.stderr
        done = oos(env, "dlq", verb, "999")
        assert done.returncode == 1 and "no task 999" in done.stderr
    assert oos(env, "dlq", "show", str(dead[0])).returncode == 0
    assert oos(env, "dlq", "purge", str(dead[1])).stdout.strip() == "purged 1"
    unknown = oos(env, "breaker", "show", "nosuch")
    assert unknown.returncode == 1 and "no queue 'nosuch'" in unknown.stderr
    shown = oos(env, "task", str(alive)).stdout
    assert ISO.search(shown.split("created_at")[1].splitlines()[0])


def test_api_times_come_as_iso_8601_too(config):
    client = create_app(config).test_client()
    headers = {"Authorization": "Bearer " + client.application.extensions["oos"]["token"]}
    task_id = client.post("/api/v1/queue/jobs/tasks", json={"task": "t"}, headers=headers).json["ids"][0]
    task = client.get(f"/api/v1/tasks/{task_id}", headers=headers).json
    assert ISO.match(task["created_at_iso"]) and task["created_at_iso"].endswith("Z")
    assert isinstance(task["created_at"], float) and task["started_at_iso"] is None


@pytest.mark.slow
def test_ctrl_c_says_what_it_waits_for(data_dir, tmp_path, config):
    d = Daemon(data_dir, tmp_path).start()
    try:
        q = QueueManager("default", DatabaseManager.from_config(config), config)
        task_id = q.enqueue("sleepy", {"seconds": 3})
        wait_for(lambda: q.get_task(task_id).state == "running", 30)
        d.signal(signal.SIGINT)
        assert d.proc.wait(60) == 0
        said = [e["event"] for e in d.logs() if str(e.get("event", "")).startswith("stopping: ")]
        assert said == ["stopping: waiting for 1 running task, up to 25 s; Ctrl-C again to stop now"]
        assert q.get_task(task_id).state == "succeeded"
    finally:
        d.cleanup()


# -- shape -------------------------------------------------------------------------------------

def test_a_second_app_in_one_process_keeps_the_first_apps_token(tmp_path):
    first = create_app(load_config(env={"OOS_DATA_DIR": str(tmp_path / "a"), "OOS_API_TOKEN": "a" * 32}))
    second = create_app(load_config(env={"OOS_DATA_DIR": str(tmp_path / "b"), "OOS_API_TOKEN": "b" * 32}))
    for app, mine, theirs in ((first, "a", "b"), (second, "b", "a")):
        client = app.test_client()
        assert client.get("/api/v1/queue/status", headers={"Authorization": "Bearer " + mine * 32}).status_code == 200
        assert client.get("/api/v1/queue/status", headers={"Authorization": "Bearer " + theirs * 32}).status_code == 401


def test_a_bad_field_travels_as_data(queue, config):
    with pytest.raises(InvalidField) as raised:
        queue.enqueue_many([{"task": "t"}, {"task": "t", "timeout": -1}])
    assert raised.value.field == "tasks[1].timeout" and isinstance(raised.value, ValueError)
    client = create_app(config).test_client()
    headers = {"Authorization": "Bearer " + client.application.extensions["oos"]["token"]}
    answer = client.post("/api/v1/queue/jobs/tasks", json={"task": "t", "payload": "x" * (config.queue_max_payload_bytes + 1)},
                         headers=headers)
    assert answer.status_code == 413 and answer.json["error"]["field"] == "payload"


@pytest.mark.parametrize("module", ["api.queues", "api.assistant", "api.monitoring", "api.auth", "api.errors",
                                    "oos_cli", "helpers.housekeeping", "oos_service_manager"])
def test_every_module_imports_on_its_own(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def test_helpers_never_import_lib():
    import ast
    for path in (ROOT / "helpers").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "lib" or n.startswith("lib.") for n in names), path
        assert '"lib.' not in path.read_text(), path


def test_the_readmes_python_examples_run_verbatim(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 2
    env = dict(os.environ, OOS_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT))
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{block}\n{done.stderr}"
    db = DatabaseManager(tmp_path / "data" / "oos.db")
    try:
        assert db.execute("SELECT queue, name FROM tasks")[0][:] == ("my_queue", "process_data")
    finally:
        db.close()
