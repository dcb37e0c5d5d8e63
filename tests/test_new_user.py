"""What a new user and real clients found (issue 27), each as a regression test."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.queue_manager import QueueManager
from tests.daemon import ROOT, Daemon, wait_for


@pytest.mark.slow
@pytest.mark.both_engines
def test_two_daemons_serving_different_queues_of_one_database_are_both_shown(data_dir, tmp_path, database_url,
                                                                            subprocess_env, db, config):
    """The README's dedicated workers: one daemon serves ``default``, another ``echo``, on the
    same data directory. ``oos status`` and ``oos workers`` list both (never one, then the
    other), and both queues are served."""
    env = {"OOS_DATABASE_URL": database_url} if database_url else {}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Daemon(data_dir, tmp_path / "a", env={**env, "OOS_WORKERS_QUEUES": "default", "OOS_WORKERS_MIN": "1",
                                                  "OOS_WORKERS_MAX": "1"})
    second = Daemon(data_dir, tmp_path / "b", env={**env, "OOS_WORKERS_QUEUES": "echo", "OOS_WORKERS_MIN": "2",
                                                   "OOS_WORKERS_MAX": "2"})
    try:
        first.start()
        second.start()
        QueueManager("echo", db, config).enqueue("echo", {"x": 1})
        QueueManager("default", db, config).enqueue("noop")

        def oos(*args):
            done = subprocess.run([sys.executable, "-m", "oos_cli", "--json", *args], env=subprocess_env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        wait_for(lambda: len(oos("workers")["workers"]) == 3, 30, what="both daemons' workers reported")
        for _ in range(5):  # polled again and again: the same two, never one then the other
            status = oos("status")
            alive = sorted(d["pid"] for d in status["daemon"]["daemons"] if d["alive"])
            assert alive == sorted([first.proc.pid, second.proc.pid])
            served = {q["queue"]: q["served"] for q in status["queues"]}
            assert served["default"] is True and served["echo"] is True
            assert status["daemon"]["workers_actual"] == 3
        workers = oos("workers")
        assert sorted(w["daemon"].rsplit(":", 1)[1] for w in workers["workers"]) == \
            sorted([str(first.proc.pid)] + [str(second.proc.pid)] * 2)
        assert first.stop() == 0
        wait_for(lambda: [d["alive"] for d in oos("status")["daemon"]["daemons"]
                          if d["pid"] == first.proc.pid] == [False], 30, what="the stopped daemon shown stopped")
        assert {q["queue"]: q["served"] for q in oos("status")["queues"]}["default"] is False
    finally:
        first.cleanup()
        second.cleanup()


@pytest.mark.slow
def test_the_web_search_tool_answers_results_or_says_it_is_not_configured(data_dir, tmp_path, remotes, database_url):
    """The assistant's ``web_search`` tool, called by a remote model through the daemon,
    against the local fake Google server: the results as JSON; without keys, one line saying
    so (it used to fail with 'SearchResponse is not JSON serializable' either way)."""
    import requests

    from tests.test_assistant_api import assistant_served

    for keys in (True, False):
        extra = {"OOS_ASSISTANT_TOOLS": "web_search", "OOS_SEARCH_BASE_URL": remotes.url + "/customsearch/v1",
                 "GOOGLE_SEARCH_API_KEY": "g" if keys else "", "GOOGLE_SEARCH_ENGINE_ID": "e" if keys else ""}
        home = tmp_path / f"keys-{keys}"
        home.mkdir()
        with assistant_served(data_dir, home, remotes, database_url, **extra) as (base, auth):
            sid = requests.post(f"{base}/sessions", json={}, headers=auth, timeout=10).json()["id"]
            remotes.script("openai", ("tool", "web_search", {"query": "oos queue"}), ("ok", "Found it."))
            answered = requests.post(f"{base}/sessions/{sid}/messages?wait=60", json={"content": "Search oos"},
                                     headers=auth, timeout=90)
            assert answered.status_code == 200, answered.text
            items = requests.get(f"{base}/sessions/{sid}/messages", headers=auth, timeout=10).json()["items"]
            result = [m for m in items if m["role"] == "tool"][0]["content"]
            if keys:
                assert [r["title"] for r in json.loads(result)][:2] == ["oos queue result 0", "oos queue result 1"]
            else:
                assert result == "web search is not configured"


def test_memory_extraction_reads_the_readmes_own_examples():
    from lib.extraction import by_rules

    assert by_rules("My name is Alice.") == [{"type": "fact", "content": "The user's name is Alice."}]
    assert by_rules("Call me Bob.") == [{"type": "preference", "content": "The user wants to be called Bob."}]
    assert by_rules("Hi, my name is Alice and I like tea")[0]["content"] == "The user's name is Alice."


def test_a_handler_asking_for_its_context_first_is_called_so():
    """``def f(context, payload)`` without bind=True used to register, then die on every run
    with 'got multiple values for argument context'."""
    from helpers.registry import TaskContext
    from helpers.tasks import task

    @task("new_user.context_first")
    def first(context, payload):
        return context.id, payload

    @task("new_user.context_by_name")
    def by_name(payload, context=None):
        return context.id, payload

    context = TaskContext(id=7, name="x", queue="default", attempt=1, max_attempts=1)
    assert first.spec.call({"a": 1}, context) == (7, {"a": 1})
    assert by_name.spec.call({"a": 1}, context) == (7, {"a": 1})


def test_why_and_the_task_page_show_times_for_people(db, config, clock):
    from helpers import blockers
    from helpers import breaker as breakers

    queue = QueueManager("jobs", db, config, clock=clock)
    task_id = queue.enqueue("t")
    breaker = breakers.queue_breaker(db, "jobs", fail_max=1, reset_timeout=60)
    with pytest.raises(RuntimeError):
        breaker.call(lambda: (_ for _ in ()).throw(RuntimeError("down")))
    breaker_reason = [r for r in blockers.why(db, config, task_id)["blockers"] if r["reason"] == "breaker"][0]
    assert re.search(r"a trial at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", breaker_reason["detail"]), \
        breaker_reason["detail"]


SERVE_ONCE = r"""
import psycopg
from scripts.pg_server import PostgresServer, bindir, server_bindir
assert str(bindir()).startswith(%r), bindir()
server = PostgresServer(fsync=False)
server.start()
try:
    with psycopg.connect(server.url) as conn:
        print(conn.execute("SELECT 1 + 1").fetchone()[0], server_bindir())
finally:
    server.stop()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as nobody only when the tests run as root")
def test_the_test_server_runs_from_a_clone_in_a_0700_home(tmp_path):
    """Root's home is 0700: a venv inside it cannot be reached by ``nobody``, whom the test
    server runs as. pgserver's binaries installed in such a directory still serve (a copy is
    made where nobody can reach it)."""
    from scripts.pg_server import bindir

    if bindir() is None:
        pytest.skip("no PostgreSQL binaries")
    home = tmp_path / "root-home"
    home.mkdir(mode=0o700)
    package = home / "site" / "pgserver"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copytree(bindir().parent, package / "pginstall", symlinks=True)
    libs = bindir().parent.parent.parent / "pgserver.libs"  # where the wheel's binaries find libpq
    if libs.is_dir():
        shutil.copytree(libs, home / "site" / "pgserver.libs", symlinks=True)
    env = dict(os.environ, PYTHONPATH=f"{home / 'site'}:{ROOT}")
    done = subprocess.run([sys.executable, "-c", SERVE_ONCE % str(home)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    two, copy = done.stdout.split()
    assert two == "2" and not copy.startswith(str(home))
    shutil.rmtree(Path(copy).parents[2], ignore_errors=True)  # the copy made for this test's install


@pytest.mark.both_engines
def test_control_actions_on_a_misspelt_queue_are_refused_not_made(db, config, subprocess_env):
    from api.app import create_app

    QueueManager("images", db, config).enqueue("resize")
    client = create_app(config).test_client()
    auth = {"Authorization": f"Bearer {client.application.extensions['oos']['token']}"}
    for method, path, body in (("post", "/api/v1/queue/imgaes/pause", None), ("post", "/api/v1/queue/imgaes/resume", None),
                               ("put", "/api/v1/queue/imgaes/limits", {"concurrency": 2}),
                               ("post", "/api/v1/queue/imgaes/circuit-breaker/reset", None)):
        answer = getattr(client, method)(path, json=body, headers=auth)
        assert answer.status_code == 404 and "no queue 'imgaes'" in answer.json["error"]["message"], (path, answer.json)
    assert client.post("/api/v1/queue/images/pause", headers=auth).status_code == 200

    def oos(*args):
        return subprocess.run([sys.executable, "-m", "oos_cli", *args], env=subprocess_env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    for command in (["pause", "imgaes"], ["resume", "imgaes"], ["limit", "imgaes", "--concurrency", "2"],
                    ["breaker", "reset", "imgaes"]):
        refused = oos(*command)
        assert refused.returncode == 1 and refused.stdout == "" and refused.stderr.count("\n") == 1, command
        assert "no queue 'imgaes'" in refused.stderr
    assert "imgaes" not in [r[0] for r in db.execute("SELECT name FROM queues")]
    assert oos("pause", "later", "--create").returncode == 0, "on purpose, ahead of its first task"
    echo = dict(subprocess_env, OOS_TASK_MODULES="tests.tasks.sample")  # a handler names queue echo
    assert subprocess.run([sys.executable, "-m", "oos_cli", "pause", "echo"], env=echo, cwd=ROOT,
                          capture_output=True, text=True, timeout=60).returncode == 0


@pytest.mark.both_engines
def test_oos_schedule_lists_what_a_daemon_registered_even_without_its_modules(db, config, subprocess_env):
    from helpers import periodic

    periodic.register(db, [periodic.Schedule(name="nightly", task="report", queue="default", cron="0 3 * * *")])
    done = subprocess.run([sys.executable, "-m", "oos_cli", "schedule"], env=subprocess_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    row = [line for line in done.stdout.splitlines() if line.startswith("nightly")]
    assert row and "nightly *" in row[0] and "0 3 * * * UTC" in row[0] and "report" in row[0], done.stdout
    listed = json.loads(subprocess.run([sys.executable, "-m", "oos_cli", "--json", "schedule"], env=subprocess_env,
                                       cwd=ROOT, capture_output=True, text=True, timeout=60).stdout)
    assert [(r["name"], r["declared"], len(r["next_runs"])) for r in listed] == [("nightly", False, 1)]


def test_a_cancelled_chain_behind_a_dead_step_reads_cancelled(db, config):
    from helpers import blockers, workflow
    from helpers.workflow import chain, step

    queue = QueueManager("jobs", db, config)
    flow = workflow.submit(db, chain(step("a", queue="jobs"), step("b", queue="jobs"), step("c", queue="jobs")), config)
    a, b, c = flow["ids"]
    first = queue.dequeue("w")
    queue.fail_task(first.id, "w", "broken", retry=False, attempt=first.attempts)
    assert workflow.status(db, a)["state"] == "blocked"
    assert blockers.why(db, config, c)["blockers"][0]["tasks"] == [a], "the dead root, not the blocked step b"
    for task_id in (b, c):
        queue.cancel_task(task_id)
    assert [queue.get_task(i).state for i in (a, b, c)] == ["dead", "cancelled", "cancelled"]
    assert workflow.status(db, a)["state"] == "cancelled"


def test_the_root_address_opens_the_dashboard(config):
    from api.app import create_app

    answer = create_app(config).test_client().get("/")
    assert answer.status_code == 302 and answer.location.endswith("/ui/")


@pytest.mark.slow
def test_a_schedule_whose_task_no_module_handles_is_warned_about_at_start(data_dir, tmp_path):
    (data_dir / "oos.toml").write_text('[schedules.nightly]\ntask = "report"\ncron = "0 3 * * *"\n')
    d = Daemon(data_dir, tmp_path).start()
    try:
        assert any("schedule nightly: no loaded task module handles task 'report'" in str(e.get("event"))
                   for e in d.logs())
    finally:
        d.cleanup()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (root only; CI runs as root)")
def test_oos_on_a_full_disk_says_what_to_do_in_one_line(tmp_path):
    from tests.test_reliability import fill

    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        from helpers.config import load_config
        from helpers.engine import open_database

        config = load_config(env={"OOS_DATA_DIR": str(mount / "data")})
        db = open_database(config)
        queue = QueueManager("default", db, config)
        queue.enqueue_many([{"task": "t", "payload": i} for i in range(500)])  # queued work to purge
        fill(mount / "filler")
        with pytest.raises(Exception, match="full"):  # until the WAL's free frames are used up
            for i in range(2000):
                queue.enqueue("t", {"pad": "x" * 20_000, "i": i})
        db.close()
        env = dict(os.environ, OOS_DATA_DIR=str(mount / "data"), PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, "-m", "oos_cli", "purge", "default", "--yes"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            pytest.skip("SQLite found room for the purge in the WAL's free frames")
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "the disk holding the database is full" in done.stderr and "Free some space" in done.stderr
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.both_engines
def test_numbers_sent_as_strings_are_refused_alike_and_times_take_iso_8601(db, config):
    from api.app import create_app

    client = create_app(config).test_client()
    auth = {"Authorization": f"Bearer {client.application.extensions['oos']['token']}"}
    for field, value in (("priority", "5"), ("delay", "10"), ("timeout", "3"), ("max_attempts", "2"), ("delay", True)):
        for body in ({"task": "t", field: value}, {"tasks": [{"task": "t", field: value}]}):
            answer = client.post("/api/v1/queue/jobs/tasks", json=body, headers=auth)
            assert answer.status_code == 422 and answer.json["error"]["field"].endswith(field), (body, answer.json)
    assert client.post("/api/v1/queue/jobs/tasks", json={"task": "t", "delay": 10}, headers=auth).status_code == 201
    made = db.execute("SELECT created_at FROM tasks")[0][0]
    import datetime
    before = datetime.datetime.fromtimestamp(made - 60, datetime.UTC).isoformat()
    after = datetime.datetime.fromtimestamp(made + 60, datetime.UTC).isoformat()
    found = client.get("/api/v1/tasks", query_string={"since": before, "until": after}, headers=auth).json
    assert [t["name"] for t in found["items"]] == ["t"]
    assert client.get(f"/api/v1/tasks?since={after.replace('+00:00', '')}", headers=auth).json["items"] == []
    bad = client.get("/api/v1/tasks?since=yesterday", headers=auth)
    assert bad.status_code == 422 and bad.json["error"]["field"] == "since"


def test_the_read_only_token_reads_the_api_and_changes_nothing(db, config):
    from api.app import create_app

    client = create_app(config.replace(api_readonly_token="r" * 32)).test_client()
    viewer = {"Authorization": "Bearer " + "r" * 32}
    assert client.get("/api/v1/queue/status", headers=viewer).status_code == 200
    assert client.get("/api/v1/workers", headers=viewer).status_code == 200
    refused = client.post("/api/v1/queue/jobs/tasks", json={"task": "t"}, headers=viewer)
    assert refused.status_code == 401 and refused.json["error"]["field"] == "Authorization"
    assert client.get("/api/v1/queue/status", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_why_says_a_task_given_back_to_its_rate_limit_waits_for_the_limit(db, config):
    import time as _time

    from helpers import blockers, limits

    limits.set_rate_limit(db, "limited", "1/min")
    assert limits.take(db, "limited", 1) == [0.0]  # the one token is spent: the next waits a minute
    queue = QueueManager("jobs", db, config)
    task_id = queue.enqueue("limited")
    db.execute("UPDATE tasks SET run_at = ? WHERE id = ?", (_time.time() + 59, task_id))  # as the worker's snooze
    reasons = [r["reason"] for r in blockers.why(db, config, task_id)["blockers"]]
    assert reasons[0] == "rate_limit" and "scheduled" not in reasons, reasons


@pytest.mark.slow
def test_tools_with_only_the_embedded_model_are_warned_about_at_start(data_dir, tmp_path):
    d = Daemon(data_dir, tmp_path, env={"OOS_ASSISTANT_TOOLS": "recall", "OOS_ASSISTANT_PROVIDERS": "local"}).start()
    try:
        assert any("the only provider is the embedded model, which cannot call tools" in str(e.get("event"))
                   for e in d.logs())
    finally:
        d.cleanup()
