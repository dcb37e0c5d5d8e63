"""The dashboard through Flask's test client, on both engines: login and roles, CSRF, the
audit log, the security headers, every page with data in it, and the actions. (The browser
tests, in a real headless Chromium, are in test_web_browser.py.)"""
from __future__ import annotations

import re

import pytest

from api.app import create_app
from helpers import history, workflow
from helpers.queue_manager import QueueManager
from helpers.workflow import chain, step

pytestmark = pytest.mark.both_engines


@pytest.fixture
def app(config):
    return create_app(config.replace(api_readonly_token="r" * 32))


@pytest.fixture
def client(app):
    return app.test_client()


def csrf(page) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)


def login(client, token: str):
    page = client.get("/ui/login")
    return client.post("/ui/login", data={"token": token, "csrf_token": csrf(page)})


def operator(client, app):
    assert login(client, app.extensions["oos"]["token"]).status_code == 302
    return client


def test_pages_need_a_login_and_a_wrong_token_is_refused(client, app):
    assert client.get("/ui/").status_code == 302 and client.get("/ui/").location.endswith("/ui/login")
    refused = login(client, "not the token")
    assert refused.status_code == 401 and "wrong token" in refused.get_data(as_text=True)
    assert client.get("/ui/queues").status_code == 302
    assert login(client, app.extensions["oos"]["token"]).status_code == 302
    cookie = client.get_cookie("oos_session")
    assert cookie.http_only and cookie.same_site == "Strict"
    page = client.get("/ui/")
    assert page.status_code == 200 and "Overview" in page.get_data(as_text=True)
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy


def test_every_page_renders_with_data(client, app, db, config):
    operator(client, app)
    queue = QueueManager("jobs", db, config)
    task_id = queue.enqueue("resize", {"secret": "s3cret-payload"})
    claimed = queue.dequeue("w")
    queue.fail_task(claimed.id, "w", "boom", retry=False)
    flow = workflow.submit(db, chain(step("a", queue="jobs"), step("b", queue="jobs")), config)
    history.record(db, config, now=1_800_000_000.0)
    history.record(db, config, now=1_800_000_060.0)
    for path in ("/ui/", "/ui/overview/live", "/ui/queues", "/ui/tasks", "/ui/dead", "/ui/workers", "/ui/schedules",
                 "/ui/audit", f"/ui/tasks/{task_id}", f"/ui/tasks/{flow['ids'][1]}"):
        page = client.get(path)
        assert page.status_code == 200, path
    detail = client.get(f"/ui/tasks/{task_id}").get_data(as_text=True)
    assert "boom" in detail and "attempt 1" in detail and "Replay" in detail
    step_page = client.get(f"/ui/tasks/{flow['ids'][1]}").get_data(as_text=True)
    assert "Workflow" in step_page and "waiting" in step_page and "it runs after task" in step_page
    assert "Why isn" not in detail  # a finished task has nothing holding it back
    assert client.get("/ui/history.json?hours=1000000").status_code == 200
    assert client.get("/ui/history.json?hours=soon").status_code == 400
    assert client.get("/ui/tasks/999999").status_code == 404


def test_task_search_is_a_post_so_the_payload_text_is_never_in_a_url(client, app, db, config):
    operator(client, app)
    queue = QueueManager("jobs", db, config)
    wanted = queue.enqueue("t", {"user": "needle"})
    queue.enqueue("t", {"user": "hay"})
    page = client.get("/ui/tasks")
    found = client.post("/ui/tasks", data={"text": "needle", "csrf_token": csrf(page)}).get_data(as_text=True)
    assert f">{wanted}</a>" in found and found.count("/ui/tasks/") == 1
    bad = client.post("/ui/tasks", data={"state": "sleeping", "csrf_token": csrf(page)})
    assert bad.status_code == 400 and "state" in bad.get_data(as_text=True)


def test_actions_are_audited_and_the_read_only_login_cannot_act(client, app, db, config):
    queue = QueueManager("jobs", db, config)
    queue.enqueue("t", None)
    assert login(client, "r" * 32).status_code == 302
    page = client.get("/ui/queues")
    assert re.search(r'<button disabled title="read-only"\s*>Pause', page.get_data(as_text=True))
    assert client.post("/ui/queues/jobs/pause", data={"csrf_token": csrf(page)}).status_code == 403
    assert not queue.is_paused()
    client.post("/ui/logout", data={"csrf_token": csrf(page)})
    operator(client, app)
    page = client.get("/ui/queues")
    assert "disabled" not in page.get_data(as_text=True)
    assert client.post("/ui/queues/jobs/pause", data={"csrf_token": csrf(page)}).status_code == 302
    assert queue.is_paused()
    actions = [(r["role"], r["action"], r["target"]) for r in db.execute("SELECT * FROM audit_log ORDER BY id")]
    assert ("viewer", "login", "viewer") in actions and ("operator", "pause", "queue jobs") in actions
    assert "queue jobs" in client.get("/ui/audit").get_data(as_text=True)


def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(client, app, db, config):
    operator(client, app)
    queue = QueueManager("jobs", db, config)
    queue.enqueue("t", None)
    refused = client.post("/ui/queues/jobs/pause", data={})
    assert refused.status_code == 400 and "CSRF" in refused.get_data(as_text=True)
    forged = client.post("/ui/queues/jobs/pause", data={"csrf_token": "forged"})
    assert forged.status_code == 400 and not queue.is_paused()


def test_replay_a_dead_task_and_the_dead_letter_bulk_actions(client, app, db, config):
    operator(client, app)
    queue = QueueManager("jobs", db, config)
    ids = [queue.enqueue("t", i) for i in range(3)]
    for _ in ids:
        task = queue.dequeue("w")
        queue.fail_task(task.id, "w", "boom", retry=False)
    page = client.get("/ui/dead")
    token = csrf(page)
    assert client.post(f"/ui/tasks/{ids[0]}/retry", data={"csrf_token": token}).status_code == 302
    assert queue.get_task(ids[0]).state == "queued"
    assert client.post("/ui/dead/retry", data={"csrf_token": token, "queue": "jobs"}).status_code == 302
    assert queue.count_dead() == 0
    assert "retry all dead" in client.get("/ui/audit").get_data(as_text=True)


def test_history_is_kept_per_minute_and_read_as_rates(db, config):
    queue = QueueManager("jobs", db, config)
    queue.pause()  # the queue exists before the first minute's row
    queue.resume()
    history.record(db, config, now=1_800_000_000.0)
    for i in range(3):
        queue.enqueue("t", i)
        task = queue.dequeue("w")
        queue.complete_task(task.id, "w", None)
    queue.enqueue("t", "waits")
    history.record(db, config, now=1_800_000_065.0)
    history.record(db, config, now=1_800_000_066.0)  # the same minute: kept once
    series = history.series(db, since=1_800_000_000.0)
    assert series["minutes"] == [1_800_000_060.0] and series["succeeded"] == [3] and series["queued"] == [1]
    history.record(db, config, now=1_800_000_000.0 + history.KEEP + 120)
    assert db.execute("SELECT min(minute) FROM metrics_history")[0][0] > 1_800_000_060.0


@pytest.mark.sqlite_only
def test_oos_token_read_only_prints_the_dashboards_second_token(subprocess_env, config, db):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "api.cli", "token", "--read-only"], env=subprocess_env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token == (config.data_dir / "api_readonly_token").read_text().strip() and len(token) > 30
