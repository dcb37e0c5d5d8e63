"""The HTTP API through Flask's test client: every endpoint, every error status, auth."""
from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from api.app import create_app
from helpers.queue_manager import QueueManager

pytestmark = pytest.mark.both_engines  # and on PostgreSQL

@pytest.fixture
def app(config):
    return create_app(config.replace(api_max_request_bytes=64 * 1024, queue_max_payload_bytes=1000))


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def auth(app):
    return {"Authorization": f"Bearer {app.extensions['oos']['token']}"}


def error_of(response):
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == response.status_code
    return body["error"]


def test_token_is_generated_once_with_mode_0600(app, config):
    path = config.data_dir / "api_token"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().strip() == app.extensions["oos"]["token"]
    assert create_app(config).extensions["oos"]["token"] == app.extensions["oos"]["token"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
def test_api_routes_need_the_token(client, headers):
    for method, path in [("get", "/api/v1/queue/status"), ("post", "/api/v1/queue/q/tasks"),
                         ("get", "/api/v1/tasks/1"), ("delete", "/api/v1/tasks/1"), ("get", "/api/v1/workers"),
                         ("post", "/api/v1/queue/q/pause"), ("post", "/api/v1/queue/q/circuit-breaker/reset")]:
        response = getattr(client, method)(path, headers=headers, json={"task": "t"} if method == "post" else None)
        assert response.status_code == 401, path
        assert error_of(response)["field"] == "Authorization"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_enqueue_one_many_and_idempotent(client, auth, db, config):
    one = client.post("/api/v1/queue/jobs/tasks", headers=auth,
                      json={"task": "resize", "payload": {"path": "a.png"}, "priority": 3, "delay": 5,
                            "max_attempts": 2, "timeout": 30, "idempotency_key": "k1"})
    assert one.status_code == 201 and one.get_json()["created"] == [True]
    task = QueueManager("jobs", db, config).get_task(one.get_json()["ids"][0])
    assert (task.name, task.task_data, task.priority, task.max_attempts, task.timeout) == ("resize", {"path": "a.png"}, 3, 2, 30)
    assert task.run_at - task.created_at == pytest.approx(5)
    again = client.post("/api/v1/queue/jobs/tasks", headers=auth, json={"task": "resize", "idempotency_key": "k1"})
    assert again.status_code == 200 and again.get_json() == {"ids": one.get_json()["ids"], "created": [False]}
    batch = client.post("/api/v1/queue/jobs/tasks", headers=auth, json={"tasks": [{"task": "a"}, {"task": "b"}]})
    bare = client.post("/api/v1/queue/jobs/tasks", headers=auth, json=[{"task": "c", "payload": [1, 2]}])
    assert batch.status_code == 201 and len(batch.get_json()["ids"]) == 2
    assert bare.status_code == 201 and len(bare.get_json()["ids"]) == 1


@pytest.mark.parametrize("body, status, field", [
    ({"payload": 1}, 422, "task"),
    ({"task": ""}, 422, "task"),
    ({"task": "x" * 201}, 422, "task"),  # a plain task and payload skip the schema; not these
    ({"task": 5, "payload": 1}, 422, "task"),
    ({"task": "   "}, 400, "task"),  # the schema allows it, the queue does not
    ({"task": "t", "priority": "high"}, 422, "priority"),
    ({"task": "t", "delay": -1}, 422, "delay"),
    ({"task": "t", "max_attempts": 0}, 422, "max_attempts"),
    ({"task": "t", "timeout": 0}, 422, "timeout"),
    ({"task": "t", "surprise": 1}, 422, "surprise"),
    ({"task": "t", "tasks": [{"task": "u"}]}, 422, "tasks"),
    ({"tasks": []}, 422, "tasks"),
    # Fields are named alike whichever check refused them: the schema's or the queue's.
    ({"tasks": [{"task": "ok"}, {"task": "t", "priority": 1.5}]}, 422, "tasks[1].priority"),
    ({"tasks": [{"task": "t", "payload": math.nan}, {"task": "t"}]}, 400, "tasks[0].payload"),  # was "payload"
    # Batches of plain tasks skip the schema too: the queue checks each, the count still holds.
    ([{"task": "t"}, {"task": "a\x00b"}], 400, "tasks[1].task"),
    ({"tasks": [{"task": "a\x00b"}]}, 400, "tasks[0].task"),  # a batch of one is still a batch
    ({"tasks": [{"task": "t"}] * 1001}, 422, "tasks"),
    ({"task": "t", "payload": "x" * 2000}, 413, "payload"),
    ({"task": "\ud800"}, 400, "task"),  # a lone surrogate: no text to store
    ({"task": "t", "idempotency_key": "\ud800"}, 422, "idempotency_key"),
    ({"task": "t", "unique_key": "a\x00b"}, 422, "unique_key"),  # PostgreSQL's text cannot hold a NUL
    ({"task": "t", "priority": 2_000_000}, 422, "priority"),
    ("a string", 422, "body"),
    ([{"task": "t"}, {"task": "t", "payload": "x" * 2000}], 413, "tasks[1].payload"),
])
def test_bad_enqueue_names_the_field_and_writes_nothing(client, auth, db, body, status, field):
    response = client.post("/api/v1/queue/jobs/tasks", headers=auth, json=body)
    assert response.status_code == status
    assert error_of(response)["field"] == field
    assert db.execute("SELECT count(*) FROM tasks")[0][0] == 0


def test_malformed_bodies(client, auth):
    bad_json = client.post("/api/v1/queue/jobs/tasks", headers=auth, data="{nope", content_type="application/json")
    assert bad_json.status_code == 400 and error_of(bad_json)["message"] == "the body is not valid JSON"
    form = client.post("/api/v1/queue/jobs/tasks", headers=auth, data="task=t", content_type="text/plain")
    assert form.status_code == 415 and error_of(form)["field"] == "Content-Type"
    huge = client.post("/api/v1/queue/jobs/tasks", headers=auth, json={"task": "t", "payload": "x" * 70_000})
    assert huge.status_code == 413 and "request body over" in error_of(huge)["message"]
    bad_queue = client.post("/api/v1/queue/no%20spaces/tasks", headers=auth, json={"task": "t"})
    assert bad_queue.status_code == 400 and error_of(bad_queue)["field"] == "queue"
    digits = client.post("/api/v1/queue/jobs/tasks", headers=auth, content_type="application/json",
                         data='{"task": "t", "payload": ' + "1" * 5000 + "}")  # over Python's int digits
    assert digits.status_code == 400 and error_of(digits)["field"] == "body"
    long_name = client.post(f"/api/v1/queue/{'q' * 20_000}/tasks", headers=auth, json={"task": "t"})
    assert long_name.status_code == 400 and len(error_of(long_name)["message"]) < 300  # not echoed whole
    assert client.post("/no/such/path", headers=auth, data="a=1", content_type="text/plain").status_code == 404
    by_schema = client.post("/api/v1/queue/jobs/tasks", headers=auth, json={"task": "t", "unique_key": "a\x00b"})
    by_queue = client.post("/api/v1/queue/jobs/tasks", headers=auth, json={"task": "a\x00b"})  # the plain path
    assert [error_of(r)["message"] for r in (by_schema, by_queue)] == [
        "unique_key: contains a NUL character or a lone surrogate, which cannot be stored",
        "task: contains a NUL character or a lone surrogate, which cannot be stored"]  # one check, one wording
    assert client.get("/no/such/path").status_code == 404
    assert client.put("/health").status_code == 405
    assert error_of(client.patch("/api/v1/queue/status", headers=auth))["code"] == 405


def test_task_get_cancel_and_conflicts(client, auth, db, config):
    queue = QueueManager("jobs", db, config)
    queued, running = queue.enqueue("t", {"a": 1}), queue.enqueue("t", None, priority=5)
    queue.dequeue("w")
    got = client.get(f"/api/v1/tasks/{queued}", headers=auth).get_json()
    assert got["state"] == "queued" and got["payload"] == {"a": 1} and got["errors"] == []
    assert client.delete(f"/api/v1/tasks/{queued}", headers=auth).get_json()["task"]["state"] == "cancelled"
    conflict = client.delete(f"/api/v1/tasks/{queued}", headers=auth)
    assert conflict.status_code == 409 and "cancelled" in error_of(conflict)["message"]
    stopping = client.delete(f"/api/v1/tasks/{running}", headers=auth)
    assert stopping.status_code == 202 and stopping.get_json()["outcome"] == "cancelling"
    assert stopping.get_json()["task"]["cancel_requested"] is not None
    assert client.get("/api/v1/tasks/4242", headers=auth).status_code == 404
    assert client.delete("/api/v1/tasks/4242", headers=auth).status_code == 404


def test_dead_letter_pages_retry_and_purge(client, auth, db, config):
    queue = QueueManager("jobs", db, config)
    for i in range(5):
        queue.enqueue("x" if i < 3 else "y", i, max_attempts=1)
        queue.fail_task(queue.dequeue("w").id, "w", f"broke {i}")
    page = client.get("/api/v1/queue/jobs/dead-letter?limit=2&offset=1", headers=auth).get_json()
    assert page["total"] == 5 and len(page["items"]) == 2 and page["items"][0]["errors"][0]["error"] == "broke 3"
    only_y = client.get("/api/v1/queue/jobs/dead-letter?task=y", headers=auth).get_json()
    assert only_y["total"] == 2
    first = page["items"][0]["id"]
    retried = client.post(f"/api/v1/queue/jobs/dead-letter/{first}/retry", headers=auth)
    assert retried.status_code == 200 and retried.get_json()["state"] == "queued"
    assert client.post(f"/api/v1/queue/jobs/dead-letter/{first}/retry", headers=auth).status_code == 404
    # A misspelt filter is refused, not dropped: it would widen the call to every dead task
    for typo in ("retry-all?tsk=x", "purge?older_then=86400"):
        refused = client.post(f"/api/v1/queue/jobs/dead-letter/{typo}", headers=auth)
        assert refused.status_code == 422 and error_of(refused)["field"] == typo.split("?")[1].split("=")[0]
    assert client.get("/api/v1/queue/jobs/dead-letter", headers=auth).get_json()["total"] == 4
    assert client.get("/api/v1/tasks?stat=dead", headers=auth).status_code == 422
    cancel_all = client.post("/api/v1/queue/jobs/purge?task=x", headers=auth)  # purge takes no filter
    assert cancel_all.status_code == 422 and error_of(cancel_all)["field"] == "task"
    assert client.get("/metrics?probe=1").status_code == 200  # probes and scrapers add their own
    assert client.post("/api/v1/queue/jobs/dead-letter/retry-all?task=x", headers=auth).get_json() == {"count": 3}
    assert client.post("/api/v1/queue/jobs/dead-letter/purge", headers=auth).get_json() == {"count": 1}
    assert client.get("/api/v1/queue/jobs/dead-letter?limit=0", headers=auth).status_code == 422


def test_status_stats_pause_resume_breaker(client, auth, db, config):
    queue = QueueManager("jobs", db, config)
    queue.enqueue("t", None)
    assert client.post("/api/v1/queue/jobs/pause", headers=auth).get_json() == {"queue": "jobs", "paused": True}
    stats = client.get("/api/v1/queue/jobs/stats", headers=auth).get_json()
    assert stats["ready"] == 1 and stats["paused"] is True and "paused" in stats["alerts"]
    assert client.post("/api/v1/queue/jobs/resume", headers=auth).get_json()["paused"] is False
    status = client.get("/api/v1/queue/status", headers=auth).get_json()
    assert [q["queue"] for q in status["queues"]] == ["jobs"]
    db.execute("INSERT INTO breakers (name, state, fail_counter, opened_at) VALUES ('queue:jobs', 'open', 10, 1) "
               "ON CONFLICT (name) DO UPDATE SET state = 'open', fail_counter = 10, opened_at = 1")
    assert client.get("/api/v1/queue/jobs/circuit-breaker", headers=auth).get_json()["state"] == "open"
    assert "breaker open" in client.get("/api/v1/queue/jobs/stats", headers=auth).get_json()["alerts"]
    reset = client.post("/api/v1/queue/jobs/circuit-breaker/reset", headers=auth).get_json()
    assert reset["state"] == "closed" and reset["fail_counter"] == 0


def test_workers_reads_the_daemon_report(client, auth, db, config):
    assert client.get("/api/v1/workers", headers=auth).get_json()["running"] is False
    import time
    report = {"pid": 1, "running": True, "workers_desired": 2, "workers_actual": 2, "last_scaling": {"reason": "r"},
              "workers": [{"pid": 5, "id": "h:5", "task_id": 7, "rss_mb": 20.5, "tasks_done": 3,
                           "started_at": 1.0, "last_beat": 2.0, "draining": False}]}
    # Every daemon has a row (several may serve one SQLite file); this host's is the one whose
    # pid its lock file holds: its scaling is shown, every daemon's workers are listed.
    from helpers.process import hold_database, worker_id
    hold_database(config).close()  # writes our pid, as the daemon writes its own
    other = dict(report, pid=2, last_scaling={"reason": "other"},
                 workers=[dict(report["workers"][0], pid=6, id="elsewhere:6", task_id=8)])
    for daemon, body in ((worker_id(), report), ("elsewhere:2", other)):
        db.execute("INSERT INTO daemon_status (daemon, host, pid, started_at, updated_at, status) "
                   "VALUES (?, ?, 1, 0, ?, ?)", (daemon, daemon.split(":")[0], time.time(), json.dumps(body)))
    got = client.get("/api/v1/workers", headers=auth).get_json()
    assert got["running"] and got["last_scaling"] == {"reason": "r"} and got["workers_actual"] == 4
    assert sorted((w["daemon"], w["task_id"]) for w in got["workers"]) == [("elsewhere:2", 8), (worker_id(), 7)]
    assert sorted(d["daemon"] for d in got["daemons"] if d["alive"]) == sorted([worker_id(), "elsewhere:2"])


def test_health_is_open_and_names_failing_checks(client, engine):
    response = client.get("/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "fail" and body["checks"]["workers"]["status"] == "fail"
    assert body["checks"]["database"]["status"] == "ok"
    # File backups are the SQLite file's; a PostgreSQL server's backups are not ours to see.
    backups = {"last_backup"} if engine == "sqlite" else set()
    assert set(body["checks"]) == {"database", "workers", "disk", "breakers"} | backups


def test_metrics_are_open_and_prometheus(client, auth, db, config):
    QueueManager("jobs", db, config).enqueue("t", {"secret": "payload"})
    client.get("/api/v1/queue/status", headers=auth)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'oos_queue_tasks{queue="jobs",state="queued"} 1.0' in text
    assert 'oos_tasks_enqueued_total{queue="jobs"} 1.0' in text
    assert 'oos_http_requests_total{endpoint="/api/v1/queue/status",method="GET",status="200"} 1.0' in text
    assert 'oos_http_request_duration_seconds_bucket{endpoint="/api/v1/queue/status",le="+Inf",method="GET"} 1.0' in text
    assert 'oos_http_request_duration_seconds_count{endpoint="/api/v1/queue/status",method="GET"} 1.0' in text
    assert "oos_workers_desired" in text and "oos_breaker_state" in text
    client.open("/health", method="ZZA1")  # any method a client makes up: one label for all of them
    text = client.get("/metrics").get_data(as_text=True)
    assert "ZZA1" not in text and 'method="other",status="405"' in text
    assert "secret" not in text


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs as the data directory (needs root, as CI and the dev machines have)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.sqlite_only
def test_a_full_disk_is_507_nothing_accepted_is_lost_and_work_resumes(small_disk):
    from helpers.config import load_config
    from helpers.database_config import DatabaseManager

    config = load_config(env={"OOS_DATA_DIR": str(small_disk)})
    db = DatabaseManager.from_config(config)
    app = create_app(config)
    client = app.test_client()
    headers = {"Authorization": f"Bearer {app.extensions['oos']['token']}"}
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 256 * 1024))
    accepted, status = [], 201
    for _ in range(2000):
        response = client.post("/api/v1/queue/jobs/tasks", headers=headers,
                               json={"tasks": [{"task": "t", "payload": "x" * 900}] * 10})
        status = response.status_code
        if status != 201:
            break
        accepted += response.get_json()["ids"]
    assert status == 507, response.get_json()
    assert "disk is full" in error_of(response)["message"]
    assert accepted, "some batches fit before the disk filled"
    assert db.check_integrity()
    stored = {r[0] for r in db.execute("SELECT id FROM tasks")}
    assert set(accepted) <= stored and len(stored) == len(accepted), "all accepted, nothing half-written"
    filler.unlink()
    again = client.post("/api/v1/queue/jobs/tasks", headers=headers, json={"task": "t"})
    assert again.status_code == 201
    db.close()


def test_openapi_document_covers_every_route(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    for path in ["/health", "/metrics", "/api/v1/queue/status", "/api/v1/queue/{name}/stats",
                 "/api/v1/queue/{name}/tasks", "/api/v1/tasks/{task_id}", "/api/v1/queue/{name}/dead-letter",
                 "/api/v1/queue/{name}/dead-letter/{task_id}/retry", "/api/v1/queue/{name}/dead-letter/retry-all",
                 "/api/v1/queue/{name}/dead-letter/purge", "/api/v1/queue/{name}/circuit-breaker",
                 "/api/v1/queue/{name}/circuit-breaker/reset", "/api/v1/queue/{name}/pause",
                 "/api/v1/queue/{name}/resume", "/api/v1/workers"]:
        assert path in spec["paths"], path
    assert spec["components"]["securitySchemes"]["BearerAuth"]["scheme"] == "bearer"
    assert spec["paths"]["/api/v1/workers"]["get"]["security"] == [{"BearerAuth": []}]
    assert "security" not in spec["paths"]["/health"]["get"], "health is open"


def test_tasks_browse_wait_and_why(client, auth, db, config):
    import threading

    queue = QueueManager("jobs", db, config)
    ids = [queue.enqueue("t", {"n": i, "tag": "find-me" if i == 3 else ""}) for i in range(5)]
    first = client.get("/api/v1/tasks?queue=jobs&limit=2", headers=auth).get_json()
    assert [t["id"] for t in first["items"]] == [ids[4], ids[3]] and first["next"] == ids[3]
    rest = client.get(f"/api/v1/tasks?queue=jobs&limit=10&before={first['next']}", headers=auth).get_json()
    assert [t["id"] for t in rest["items"]] == ids[2::-1] and rest["next"] is None
    assert [t["id"] for t in client.get("/api/v1/tasks?text=find-me", headers=auth).get_json()["items"]] == [ids[3]]
    bad = client.get("/api/v1/tasks?state=sleeping", headers=auth)
    assert bad.status_code == 422 and error_of(bad)["field"] == "state"
    why = client.get(f"/api/v1/tasks/{ids[2]}/why", headers=auth).get_json()
    assert {"no_daemon", "ahead"} <= {b["reason"] for b in why["blockers"]}
    assert client.get("/api/v1/tasks/999999/why", headers=auth).status_code == 404
    claimed = queue.dequeue("w")
    threading.Timer(0.3, lambda: queue.complete_task(claimed.id, "w", {"done": True})).start()
    got = client.get(f"/api/v1/tasks/{claimed.id}?wait=30", headers=auth).get_json()
    assert got["state"] == "succeeded" and got["result"] == {"done": True}
    still = client.get(f"/api/v1/tasks/{ids[4]}?wait=0.1", headers=auth).get_json()
    assert still["state"] == "queued"
    too_long = client.get(f"/api/v1/tasks/{ids[4]}?wait=600", headers=auth)
    assert too_long.status_code == 422 and error_of(too_long)["field"] == "wait"


def test_workflows_limits_purge_and_schedules(client, auth, db, config):
    steps = [{"task": "a", "queue": "wf"}, {"task": "b", "queue": "wf", "after": [0]}]
    made = client.post("/api/v1/workflows", json={"steps": steps}, headers=auth)
    assert made.status_code == 201
    flow = client.get(f"/api/v1/workflows/{made.get_json()['ids'][1]}", headers=auth).get_json()
    assert [s["state"] for s in flow["steps"]] == ["queued", "waiting"] and flow["steps"][1]["after"] == [flow["workflow"]]
    cycle = client.post("/api/v1/workflows", json={"steps": [{"task": "a", "after": [1]}, {"task": "b", "after": [0]}]},
                        headers=auth)
    assert cycle.status_code == 400 and error_of(cycle)["field"].endswith(".after")
    assert "cycle" in error_of(cycle)["message"]
    assert client.get("/api/v1/workflows/999999", headers=auth).status_code == 404
    assert client.post("/api/v1/queue/wf/purge", headers=auth).get_json() == {"count": 2}
    limited = client.put("/api/v1/queue/wf/limits", json={"concurrency": 3}, headers=auth)
    assert limited.get_json() == {"queue": "wf", "concurrency": 3}
    negative = client.put("/api/v1/queue/wf/limits", json={"concurrency": -1}, headers=auth)
    assert negative.status_code == 422 and error_of(negative)["field"] == "concurrency"
    rated = client.put("/api/v1/rate-limits/mail", json={"rate": "10/min"}, headers=auth)
    assert rated.get_json() == {"rate_limits": {"mail": "10/min"}}
    bad_rate = client.put("/api/v1/rate-limits/mail", json={"rate": "often"}, headers=auth)
    assert bad_rate.status_code == 400 and error_of(bad_rate)["field"] == "rate"
    long_rate = client.put("/api/v1/rate-limits/mail", json={"rate": "0" * 1000 + "1/s"}, headers=auth)
    assert long_rate.status_code == 422 and error_of(long_rate)["field"] == "rate"
    assert client.put("/api/v1/rate-limits/mail", json={"rate": None}, headers=auth).get_json() == {"rate_limits": {}}
    nightly = {"nightly": {"task": "report", "cron": "0 3 * * *", "tz": "Europe/Paris", "queue": "reports"}}
    scheduled = create_app(config.replace(schedules=nightly))
    headers = {"Authorization": f"Bearer {scheduled.extensions['oos']['token']}"}
    listed = {s["name"]: s for s in scheduled.test_client().get("/api/v1/schedules", headers=headers).get_json()["schedules"]}
    assert listed["nightly"]["cron"] == "0 3 * * *" and listed["nightly"]["queue"] == "reports"
    assert len(listed["nightly"]["next_runs"]) == 3 and listed["nightly"]["next_runs"][0] > 0
    unique = client.post("/api/v1/queue/u/tasks", json=[{"task": "t", "unique_key": "k"}, {"task": "t", "unique_key": "k"}],
                         headers=auth).get_json()
    assert unique["ids"][0] == unique["ids"][1] and unique["created"] == [True, False]


def test_waiting_requests_hold_at_most_half_the_server_threads(config, db):
    import threading
    import time

    from tests.daemon import wait_for

    app = create_app(config.replace(api_threads=2))  # one waiter at a time
    client, auth = app.test_client(), {"Authorization": f"Bearer {app.extensions['oos']['token']}"}
    queue = QueueManager("jobs", db, config)
    task_id = queue.enqueue("t", None)
    first = {}
    waiter = threading.Thread(target=lambda: first.update(
        answer=client.get(f"/api/v1/tasks/{task_id}?wait=60", headers=auth).get_json()))
    waiter.start()
    permits = app.extensions["oos"]["waiters"]

    def taken() -> bool:  # by the first request (a permit we get, we give back at once)
        if permits.acquire(blocking=False):
            permits.release()
            return False
        return True
    wait_for(taken, 10, what="the first wait")
    began = time.monotonic()
    second = client.get(f"/api/v1/tasks/{task_id}?wait=60", headers=auth).get_json()
    assert second["state"] == "queued" and time.monotonic() - began < 30  # answered, not held
    # The first request's wait marks the task watched (on PostgreSQL, an UPDATE of its row):
    # a claim at that moment skips the locked row, so the claim may wait a little.
    claimed = queue.dequeue_batch("w", 1, wait=10)[0]
    queue.complete_task(claimed.id, "w", 5)
    waiter.join(60)
    assert first["answer"]["state"] == "succeeded" and first["answer"]["result"] == 5


def test_numbers_are_json_numbers_as_json_schema_reads_them(client, auth, db, config):
    """An integer field takes 5 and 5.0 (JSON Schema's integer), never "5", 5.5 or true; a
    rate the document's pattern refuses is refused, and the document shows the pattern."""
    made = client.post("/api/v1/queue/jobs/tasks", headers=auth, json={"task": "t", "priority": 4790.0})
    assert made.status_code == 201
    assert QueueManager("jobs", db, config).get_task(made.get_json()["ids"][0]).priority == 4790
    for bad in ("5", 5.5, True):
        refused = client.post("/api/v1/queue/jobs/tasks", headers=auth, json={"task": "t", "priority": bad})
        assert refused.status_code == 422 and error_of(refused)["field"] == "priority"
    step = client.post("/api/v1/workflows", headers=auth, json={"steps": [{"task": "a"}, {"task": "b", "after": [0.0]}]})
    assert step.status_code == 201
    pattern = client.get("/api/v1/openapi.json").get_json()["components"]["schemas"]["RateLimitIn"]["properties"]["rate"]["pattern"]
    import re
    for rate in ("0/s", "00.0/min", "10/x"):
        assert not re.match(pattern, rate)
        assert client.put("/api/v1/rate-limits/mail", headers=auth, json={"rate": rate}).status_code == 400
    assert re.match(pattern, "0.5/min") and client.put("/api/v1/rate-limits/mail", headers=auth,
                                                       json={"rate": "0.5/min"}).status_code == 200
    enqueue = client.get("/api/v1/openapi.json").get_json()["paths"]["/api/v1/queue/{name}/tasks"]["post"]["requestBody"]
    assert enqueue["required"] and [form.get("$ref", form.get("type")) for form in enqueue["content"]["application/json"]
                                    ["schema"]["oneOf"]] == ["#/components/schemas/TaskIn",
                                                              "#/components/schemas/TaskBatchIn", "array"]


def test_the_document_reads_well_to_a_generated_client(client):
    """Each operation has a unique operationId (the view's name), a summary that is a whole
    sentence or title, 413/415 where it takes a body; each schema is one component (no
    TaskOut1 beside TaskOut); answers may gain fields (no additionalProperties: false)."""
    doc = client.get("/api/v1/openapi.json").get_json()
    operations = [o for path in doc["paths"].values() for o in path.values() if isinstance(o, dict) and "responses" in o]
    ids = [o["operationId"] for o in operations]
    assert len(ids) == len(set(ids)) and {"enqueue", "get_task", "cancel_task", "stream_reply"} <= set(ids)
    assert all(o["summary"].endswith((".", ")")) or " " not in o["summary"].strip(". ") or o["summary"].istitle()
               for o in operations)
    assert all({"413", "415"} <= set(o["responses"]) for o in operations if "requestBody" in o)
    schemas = doc["components"]["schemas"]
    assert not [name for name in schemas if name[-1].isdigit()]
    assert not [name for name, schema in schemas.items() if name.endswith("Out") and "additionalProperties" in schema]
    assert schemas["TaskIn"]["additionalProperties"] is False  # requests stay strict


def test_docs_serve_swagger_ui_from_this_server_with_no_inline_script(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "script-src 'self';" in page.headers["Content-Security-Policy"]
    html = page.get_data(as_text=True)
    assert "<script>" not in html and "/docs/vendor/swagger-ui-bundle.js" in html and "http" not in html
    assert client.get("/docs/vendor/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs/vendor/../../app.py").status_code == 404
    assert client.get("/docs/vendor/index.html").status_code == 404  # only the two files it needs
