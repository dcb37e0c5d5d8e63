"""The API on a real loopback port inside the real daemon (with schemathesis against its
OpenAPI document), and the ``oos`` command run as a subprocess."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest
import requests

from helpers.config import load_config
from helpers.queue_manager import QueueManager
from tests.daemon import ROOT, Daemon, free_port, started_by, wait_for

OOS = str(ROOT / ".venv" / "bin" / "oos") if (ROOT / ".venv" / "bin" / "oos").exists() else "oos"


@pytest.fixture
def served(data_dir, tmp_path, database_url):
    port = free_port()
    # No LLM provider: a fuzzed assistant message dead-letters at once instead of keeping
    # the local model busy (the assistant tests cover replies).
    env = {"OOS_API_ENABLED": "true", "OOS_API_PORT": str(port), "OOS_ASSISTANT_PROVIDERS": "none"}
    daemon = Daemon(data_dir, tmp_path, env=dict(env, OOS_DATABASE_URL=database_url) if database_url else env)
    try:
        daemon.start()
        token = (data_dir / "api_token").read_text().strip()
        yield f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}, daemon
    finally:
        daemon.cleanup()


@pytest.mark.slow
@pytest.mark.both_engines
def test_the_daemon_serves_the_api_on_loopback(served, db, config, subprocess_env):
    base, auth, daemon = served
    assert requests.get(f"{base}/health", timeout=10).status_code == 200
    assert requests.get(f"{base}/api/v1/queue/status", timeout=10).status_code == 401
    created = requests.post(f"{base}/api/v1/queue/default/tasks", headers=auth, timeout=10,
                            json={"task": "noop", "payload": {"n": 1}})
    assert created.status_code == 201
    task_id = created.json()["ids"][0]
    done = wait_for(lambda: (r := requests.get(f"{base}/api/v1/tasks/{task_id}", headers=auth, timeout=10).json())
                    ["state"] == "succeeded" and r, 30, what="the task to run")
    assert done["result"] == {"ok": True}
    workers = requests.get(f"{base}/api/v1/workers", headers=auth, timeout=10).json()
    assert workers["running"] and workers["workers_actual"] >= 1 and workers["workers"][0]["pid"]
    metrics = requests.get(f"{base}/metrics", timeout=10).text
    assert 'oos_task_duration_seconds_count{outcome="ok",queue="default",task="noop"} 1.0' in metrics
    assert 'oos_task_queue_wait_seconds_count{queue="default",task="noop"} 1.0' in metrics
    # Per task name, as the workers write it (every 10 s while they run, and when they stop).
    by_task = wait_for(lambda: [m for m in requests.get(f"{base}/api/v1/task-metrics", headers=auth, timeout=10)
                                .json()["items"] if m["task"] == "noop"], 30, what="the worker's counts")
    assert by_task[0]["runs"] == 1 and by_task[0]["failures"] == 0 and by_task[0]["run_p50"] is not None
    assert requests.get(f"{base}/api/v1/openapi.json", timeout=10).json()["info"]["title"] == "OOS"
    # The API is supervised: killed, it comes back on the same port.
    port = int(base.rsplit(":", 1)[1])
    listener = wait_for(lambda: api_pid(daemon, port), 10, what="the API process")
    os.kill(listener, signal.SIGKILL)
    wait_for(lambda: (pid := api_pid(daemon, port)) and pid != listener, 30, what="a new API process")
    assert wait_for(lambda: answers(f"{base}/health"), 30, what="the API to answer again")
    assert daemon.stop() == 0
    shown = oos(subprocess_env, "--json", "metrics", "--hours", "24")
    assert [(m["task"], m["runs"]) for m in json.loads(shown.stdout)] == [("noop", 1)], shown.stderr
    assert "NOOP" not in (table := oos(subprocess_env, "metrics").stdout) and "noop" in table and "RUN MEAN" in table


@pytest.mark.slow
def test_schemathesis_with_every_check_finds_nothing(served, tmp_path):
    """Every check: no server error, every answer as documented, every schema-valid request
    accepted and every invalid one refused, created resources found, answers within 10 s, on a
    few hundred generated requests and stateful sequences. What the document cannot say is
    allowed where it applies, with its reason, in tests/schemathesis.toml. (The coverage phase,
    some 1,500 boundary cases more, takes 2-3 minutes: README's "API contract" runs it.)"""
    base, auth, _ = served
    st = ROOT / ".venv" / "bin" / "schemathesis"
    done = subprocess.run([str(st) if st.exists() else "schemathesis", "--config-file",
                           str(ROOT / "tests" / "schemathesis.toml"), "run", f"{base}/api/v1/openapi.json",
                           "-H", f"Authorization: {auth['Authorization']}", "--max-examples", "8", "--seed", "1",
                           "--generation-database", "none", "--request-timeout", "70", "-c", "all",
                           "--phases", "examples,fuzzing,stateful"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its crash cache: tmp_path
    assert done.returncode == 0, done.stdout[-6000:]


def api_pid(daemon, port: int) -> int | None:
    for child in started_by(daemon.proc.pid):
        try:
            if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in child.net_connections()):
                return child.pid
        except psutil.NoSuchProcess:
            pass
    return None


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code in (200, 503)
    except requests.RequestException:
        return False


def oos(env, *args):
    return subprocess.run([OOS, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.both_engines
def test_cli_end_to_end(subprocess_env, db, config):
    env = subprocess_env
    made = oos(env, "enqueue", "jobs", "resize", "--payload", '{"path": "a.png"}', "--priority", "2")
    assert made.returncode == 0, made.stderr
    task_id = int(made.stdout)
    shown = json.loads(oos(env, "--json", "task", str(task_id)).stdout)
    assert shown["name"] == "resize" and shown["payload"] == {"path": "a.png"} and shown["priority"] == 2
    assert "state           " in oos(env, "task", str(task_id)).stdout
    status = json.loads(oos(env, "--json", "status").stdout)
    assert status["daemon"]["running"] is False and status["queues"][0]["ready"] == 1
    assert "jobs" in oos(env, "status").stdout

    queue = QueueManager("jobs", db, config)
    queue.fail_task(queue.dequeue("w").id, "w", "boom", retry=False)
    listed = json.loads(oos(env, "--json", "dlq", "list", "jobs").stdout)
    assert listed["total"] == 1 and listed["items"][0]["last_error"] == "boom"
    assert "attempt 1" in oos(env, "dlq", "show", str(task_id)).stdout
    assert oos(env, "dlq", "retry", str(task_id)).stdout.strip() == "requeued 1"
    queue.fail_task(queue.dequeue("w").id, "w", "boom again", retry=False)
    assert json.loads(oos(env, "--json", "dlq", "retry", "--all", "--queue", "jobs").stdout) == {"count": 1}
    queue.fail_task(queue.dequeue("w").id, "w", "third", retry=False)
    assert oos(env, "dlq", "purge", "--all").stdout.strip() == "purged 1"

    assert oos(env, "pause", "jobs").returncode == 0 and queue.is_paused()
    assert oos(env, "resume", "jobs").returncode == 0 and not queue.is_paused()
    db.execute("INSERT INTO breakers (name, state, fail_counter) VALUES ('queue:jobs', 'open', 10) "
               "ON CONFLICT (name) DO UPDATE SET state = 'open', fail_counter = 10")
    assert json.loads(oos(env, "--json", "breaker", "show", "jobs").stdout)["state"] == "open"
    assert oos(env, "breaker", "reset", "jobs").returncode == 0
    assert "closed" in oos(env, "breaker", "show").stdout
    assert "not running" in oos(env, "workers").stdout
    token = oos(env, "token").stdout.strip()
    assert token == (config.data_dir / "api_token").read_text().strip() and len(token) > 30
    scripts = [sys.executable, str(ROOT / "scripts" / "worker_scaler.py"), "--json"]
    assert json.loads(subprocess.run(scripts, env=env, capture_output=True, text=True, timeout=60).stdout)["running"] is False
    retry = subprocess.run([sys.executable, str(ROOT / "scripts" / "retry_failed_task.py"), "--all", "--queue", "jobs"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert retry.returncode == 0 and retry.stdout.strip() == "requeued 0"


@pytest.mark.both_engines
def test_oos_enqueue_offers_every_field_an_enqueue_may_set(subprocess_env, db, config):
    env = subprocess_env
    helped = oos(env, "enqueue", "--help").stdout
    from helpers.queue_manager import SPEC_FIELDS
    assert all(f"--{name.replace('_', '-')}" in helped for name in SPEC_FIELDS - {"task", "payload"})
    first = oos(env, "enqueue", "jobs", "mail", "--unique-key", "user-7", "--unique-for", "60", "--run-at", "2000000000")
    assert first.returncode == 0, first.stderr
    again = oos(env, "enqueue", "jobs", "mail", "--unique-key", "user-7")
    assert again.stdout == first.stdout  # the unique key held: the same task
    task = QueueManager("jobs", db, config).get_task(int(first.stdout))
    assert task.run_at == 2_000_000_000 and task.unique_key == "user-7"
    assert oos(env, "enqueue", "jobs", "mail", "--unique-for", "60").stderr.strip() == "oos: unique_for: needs unique_key"


@pytest.mark.parametrize("args, code, message", [
    (["task", "999"], 1, "oos: no task 999"),
    (["enqueue", "jobs", "t", "--payload", "{bad"], 1, "oos: --payload: not valid JSON"),
    (["enqueue", "bad queue", "t"], 1, "oos: queue: expected"),
    (["enqueue", "jobs", ""], 1, "oos: task: expected a non-empty name"),
    (["enqueue", "jobs", "t", "--delay", "-1"], 1, "oos: delay: must be >= 0"),
    (["enqueue", "jobs", "t", "--priority", str(2**70)], 1, "oos: priority: must be <= 1000000"),
    (["tasks", "--before", str(2**64)], 1, "oos: before: must fit a 64-bit integer"),
    (["dlq", "retry"], 2, "give a TASK_ID or --all"),
    (["dlq", "retry", "5"], 1, "oos: no task 5"),
    (["cancel", "77"], 1, "oos: no task 77"),
    (["why", "77"], 1, "oos: no task 77"),
    (["tasks", "--state", "asleep"], 2, "Invalid value for '--state'"),
    (["limit", "jobs", "--concurrency", "-3"], 1, "oos: concurrency: must be >= 1"),
    (["rate-limit", "mail", "lots"], 1, "oos: rate: expected N/s"),
    (["rate-limit", "mail", "1" + "0" * 400 + "/s"], 1, "oos: rate: expected N/s"),  # no infinite rate
    (["purge", "nosuchqueue", "--yes"], 1, "oos: no queue 'nosuchqueue'"),
    (["workflow", "submit", "-"], 1, "oos: <stdin>: not JSON"),
    (["nonsense"], 2, "No such command"),
])
@pytest.mark.both_engines
def test_cli_errors_are_one_line_and_non_zero(subprocess_env, db, args, code, message):
    done = oos(subprocess_env, *args)
    assert done.returncode == code
    assert message in done.stderr
    if code == 1:
        assert len(done.stderr.strip().splitlines()) == 1
    assert db.execute("SELECT count(*) FROM tasks")[0][0] == 0


def test_the_daemon_answers_help_and_bad_arguments_without_starting(subprocess_env, tmp_path):
    env = dict(subprocess_env, OOS_DATA_DIR=str(tmp_path / "never"))
    daemon = [sys.executable, str(ROOT / "oos_service_manager.py")]
    shown = subprocess.run([*daemon, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "SIGHUP" in shown.stdout and "OOS_* variables" in shown.stdout
    wrong = subprocess.run([*daemon, "--bogus"], env=env, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unrecognized arguments: --bogus" in wrong.stderr
    assert not (tmp_path / "never").exists()  # no database, no token: nothing started


@pytest.mark.both_engines
def test_cli_job_features(subprocess_env, db, config, tmp_path):
    env = subprocess_env
    queue = QueueManager("jobs", db, config)
    ids = [queue.enqueue("resize", {"n": i}) for i in range(3)]
    listed = json.loads(oos(env, "--json", "tasks", "--queue", "jobs", "--limit", "2").stdout)
    assert [t["id"] for t in listed["items"]] == ids[:0:-1] and listed["next"] == ids[1]
    assert f"more: --before {ids[1]}" in oos(env, "tasks", "--queue", "jobs", "--limit", "2").stdout
    why = oos(env, "why", str(ids[2]))
    assert why.returncode == 0 and "no_daemon" in why.stdout and "ahead: 2 ready tasks are ahead" in why.stdout
    waited = oos(env, "task", str(ids[0]), "--wait", "0.2")
    assert waited.returncode == 1 and "queued" in waited.stdout
    claimed = queue.dequeue("w")
    assert oos(env, "cancel", str(claimed.id)).stdout.strip() == f"cancelling {claimed.id}: its worker stops it"
    refused = subprocess.run(
        [OOS, "purge", "jobs"], env=env, input="n\n", capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and queue.stats()["counts"]["queued"] == 2
    assert oos(env, "purge", "jobs", "--yes").stdout.strip() == "cancelled 2 tasks of jobs"
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps({"steps": [{"task": "a", "queue": "wf"}, {"task": "b", "queue": "wf", "after": [0]}]}))
    made = json.loads(oos(env, "--json", "workflow", "submit", str(flow)).stdout)
    shown = oos(env, "workflow", "show", str(made["workflow"])).stdout
    assert f"workflow {made['workflow']} is waiting" in shown and "waiting" in shown
    cycle = flow.with_name("cycle.json")
    cycle.write_text(json.dumps([{"task": "a", "after": [1]}, {"task": "b", "after": [0]}]))
    refused = oos(env, "workflow", "submit", str(cycle))
    assert refused.returncode == 1 and "steps[" in refused.stderr and "cycle" in refused.stderr
    assert oos(env, "limit", "jobs", "--concurrency", "4").stdout.strip() == "jobs: concurrency 4"
    assert json.loads(oos(env, "--json", "rate-limit", "resize", "5/min").stdout) == {"resize": "5/min"}
    (config.data_dir / "oos.toml").write_text('[schedules.nightly]\ntask = "resize"\ncron = "0 3 * * *"\n')
    listed = oos(env, "schedule")
    assert listed.returncode == 0 and "nightly" in listed.stdout and "0 3 * * * UTC" in listed.stdout


def test_cli_works_with_a_bad_config_saying_so(subprocess_env, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[workers]\nmax = 'lots'\n")
    done = oos(dict(subprocess_env, OOS_CONFIG=str(bad)), "status")
    assert done.returncode == 1 and done.stderr.strip() == "oos: config workers_max: expected int, got 'lots'"
    assert os.path.exists(bad)


@pytest.mark.parametrize("setting, message", [
    (dict(queue_max_attempts=0), "config queue_max_attempts: must be >= 1"),
    (dict(queue_lease_seconds=30 * 86_400), "config queue_lease_seconds: must be <= 604800"),
])
def test_a_task_default_out_of_the_task_ranges_is_a_config_error(setting, message):
    with pytest.raises(ValueError, match=message):
        load_config(env={}, **setting)


@pytest.mark.slow
def test_a_taken_api_port_stops_the_daemon_with_a_named_code(data_dir, tmp_path):
    from helpers.exit_codes import API as RET_API

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        daemon = Daemon(data_dir, tmp_path, env={"OOS_API_ENABLED": "true",
                                                 "OOS_API_PORT": str(taken.getsockname()[1])})
        try:
            daemon.start(wait_ready=False)
            assert daemon.proc.wait(120) == RET_API
            assert "READY=1" not in daemon.notify.lines(), "never ready without its API"
            assert any(e.get("event") == "API cannot listen" for e in daemon.logs())
        finally:
            daemon.cleanup()
