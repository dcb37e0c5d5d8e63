"""The dashboard through Flask's test client, on both engines: login and roles, CSRF, the
audit log, the security headers, every page with data in it, and the actions. (The browser
tests, in a real headless Chromium, are in test_web_browser.py.)"""
from __future__ import annotations

import html
import re
import time

import pytest

from api.app import create_app
from helpers import bulk, history, reports, worker_requests, workflow
from helpers.backup import create_backup
from helpers.queue_manager import QueueManager, set_progress
from helpers.registry import REGISTRY, TaskContext
from helpers.validation import InvalidField
from helpers.workflow import chain, step
from lib.assistant import Assistant

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
    chat = Assistant(config, db)
    session = chat.create_session("be brief", user_id="ann")
    chat.post_message(session["id"], "my dog is called Rex")
    chat.memories.add("fact", "ann has a dog called Rex", session["id"], "ann")
    for path in ("/ui/", "/ui/overview/live", "/ui/queues", "/ui/tasks", "/ui/dead", "/ui/workers", "/ui/schedules",
                 "/ui/audit", f"/ui/tasks/{task_id}", f"/ui/tasks/{flow['ids'][1]}", "/ui/database", "/ui/assistant",
                 f"/ui/assistant/{session['id']}"):
        page = client.get(path)
        assert page.status_code == 200, path
    detail = client.get(f"/ui/tasks/{task_id}").get_data(as_text=True)
    assert "boom" in detail and "attempt 1" in detail and "Replay" in detail
    step_page = client.get(f"/ui/tasks/{flow['ids'][1]}").get_data(as_text=True)
    assert "Workflow" in step_page and "waiting" in step_page and "it runs after task" in step_page
    assert "Why isn" not in detail  # a finished task has nothing holding it back
    assert client.get("/ui/history.json?hours=1000000").status_code == 200
    assert client.get("/ui/history.json?hours=soon").status_code == 400
    assert client.get("/ui/history.json?hours=nan").status_code == 400
    assert client.get("/ui/tasks/999999").status_code == 404
    assistant = client.get("/ui/assistant").get_data(as_text=True)
    assert session["id"][:12] in assistant and "ann has a dog called Rex" in assistant
    conversation = client.get(f"/ui/assistant/{session['id']}").get_data(as_text=True)
    assert "my dog is called Rex" in conversation and "pending" in conversation and "be brief" in conversation
    assert client.get("/ui/assistant/nosuchsession").status_code == 404


def test_a_plan_shows_its_agents_step_by_step_and_a_reply_shows_its_text_as_it_is_written(client, app, db, config):
    from lib import plans
    from lib.llm_providers import ProviderChain
    from lib.stream import ReplyStream

    operator(client, app)
    chat = Assistant(config, db)
    session = chat.create_session(user_id="ann")
    posted = chat.post_message(session["id"], "1. Find flights\n2. Find hotels\n3. Pack", plan=True)
    message = dict(db.execute("SELECT m.*, NULL AS preferred, 'ann' AS user_id FROM assistant_messages m "
                              "WHERE id = ?", (posted["message_id"],))[0])
    assert plans.start(chat, message, ProviderChain([], db))["agents"] == 3  # no remote model: by rules
    assert plans.start(chat, message, ProviderChain([], db))["plan"] == "submitted before"
    view = plans.view(db, posted["message_id"])
    page = client.get(f"/ui/assistant/{session['id']}").get_data(as_text=True)
    assert "Plan (rules): running" in page and "Find hotels" in page and 'hx-trigger="every 2s"' in page
    agent = view["steps"][1]["session_id"]
    assert f"/ui/assistant/{agent}" in page and f"/ui/tasks/{view['steps'][1]['task_id']}" in page
    agent_page = client.get(f"/ui/assistant/{agent}").get_data(as_text=True)
    assert "step 2 of the plan for message" in agent_page and "Find hotels" in agent_page
    writing = db.execute("SELECT agent_message_id FROM assistant_plan_steps WHERE position = 1")[0][0]
    ReplyStream(db, writing).text("Hotel Ba")
    agent_page = client.get(f"/ui/assistant/{agent}").get_data(as_text=True)
    assert "being written" in agent_page and "Hotel Ba" in agent_page


def test_task_search_is_a_post_so_the_payload_text_is_never_in_a_url(client, app, db, config):
    operator(client, app)
    queue = QueueManager("jobs", db, config)
    wanted = queue.enqueue("t", {"user": "needle"})
    queue.enqueue("t", {"user": "hay"})
    page = client.get("/ui/tasks")
    found = client.post("/ui/tasks", data={"text": "needle", "csrf_token": csrf(page)}).get_data(as_text=True)
    assert f">{wanted}</a>" in found and found.count("/ui/tasks/") == 1
    # 50 a page: "Older" posts the search again with the page's cursor.
    many = [e.id for e in queue.enqueue_many([{"task": "t", "payload": {"user": "needle", "n": i}} for i in range(55)])]
    first = client.post("/ui/tasks", data={"text": "needle", "csrf_token": csrf(page)}).get_data(as_text=True)
    cursor = re.search(r'name="before" value="(\d+)"', first).group(1)
    older = client.post("/ui/tasks", data={"text": "needle", "before": cursor, "csrf_token": csrf(page)})
    assert {int(i) for i in re.findall(r"/ui/tasks/(\d+)\"", older.get_data(as_text=True))} == {wanted, *many[:5]}
    assert 'name="before"' not in older.get_data(as_text=True)
    bad = client.post("/ui/tasks", data={"state": "sleeping", "csrf_token": csrf(page)})
    assert bad.status_code == 400 and "state" in bad.get_data(as_text=True)
    for field in ("text", "name"):  # PostgreSQL's text cannot hold a NUL
        nul = client.post("/ui/tasks", data={field: "a\x00b", "csrf_token": csrf(page)})
        assert nul.status_code == 400 and f"{field}: contains a NUL character" in nul.get_data(as_text=True)


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


def run_job(db, config, job_id: int) -> dict:
    """Run the bulk job the way a worker does: claim it, call its handler with a context that
    stores progress, record the result. (Its handler opens the database of the environment's
    configuration, as the daemon's workers do: the test's environment says the test's.)"""
    queue = QueueManager(bulk.QUEUE, db, config)
    claimed = queue.dequeue("w")
    assert claimed.id == job_id
    context = TaskContext(claimed.id, claimed.name, claimed.queue, claimed.attempts, claimed.max_attempts,
                          _progress=lambda f, m: set_progress(db, claimed.id, "w", claimed.attempts, f, m))
    result = REGISTRY[bulk.TASK].call(claimed.payload, context)
    queue.complete_task(claimed.id, "w", result)
    return result


def test_replay_one_dead_task_and_replay_all_matching_as_a_background_job(client, app, db, config, monkeypatch):
    monkeypatch.setattr(bulk, "BATCH", 2)  # several batches over a handful of tasks
    monkeypatch.setenv("OOS_DATA_DIR", str(config.data_dir))
    if config.database_url:
        monkeypatch.setenv("OOS_DATABASE_URL", config.database_url)
    operator(client, app)
    queue = QueueManager("jobs", db, config)
    ids = [queue.enqueue("t", {"user": "alice" if i % 2 else "bob", "n": i}) for i in range(8)]
    for _ in ids:
        task = queue.dequeue("w")
        queue.fail_task(task.id, "w", "boom", retry=False)
    token = csrf(client.get("/ui/dead"))
    assert client.post(f"/ui/tasks/{ids[0]}/retry", data={"csrf_token": token}).status_code == 302
    assert queue.get_task(ids[0]).state == "queued"
    queue.complete_task(queue.dequeue("w").id, "w", None)

    # The payload search (a POST: never in a URL) finds alice's four.
    found = client.post("/ui/dead", data={"csrf_token": token, "text": "alice"}).get_data(as_text=True)
    assert "payloads containing “alice”" in found and found.count('action="/ui/tasks/') == 4
    assert all(f">{i}</a>" in found for i in ids[1::2])

    # "Replay all matching" enqueues one job and shows its page; it touches what was dead then.
    asked = client.post("/ui/dead/retry", data={"csrf_token": token, "text": "alice"})
    assert asked.status_code == 302
    job = int(asked.location.rsplit("/", 1)[1])
    assert queue.get_task(job).name == bulk.TASK and "in the background" in client.get(asked.location).get_data(as_text=True)
    late = queue.enqueue("t", {"user": "alice", "n": 99})
    queue.fail_task(queue.dequeue("w").id, "w", "boom", retry=False)
    assert run_job(db, config, job) == {"action": "retry", "done": 4, "total": 4}
    assert [queue.get_task(i).state for i in ids[1::2]] == ["queued"] * 4
    assert queue.get_task(late).state == "dead" and queue.count_dead() == 4  # bob's three, and the late one
    done = queue.get_task(job)
    assert (done.state, done.progress, done.progress_message) == ("succeeded", 1.0, "4 of 4 replayed")

    # Delete all matching a task name and queue; the audit log says what, never the search text.
    purge = client.post("/ui/dead/purge", data={"csrf_token": token, "queue": "jobs", "name": "t"})
    assert run_job(db, config, int(purge.location.rsplit("/", 1)[1]))["done"] == 4 and queue.count_dead() == 0
    audit = client.get("/ui/audit").get_data(as_text=True)
    assert "retry all dead" in audit and "payload search" in audit and "alice" not in audit
    assert client.post("/ui/dead/sweep", data={"csrf_token": token}).status_code == 400
    assert client.post("/ui/dead/retry", data={"csrf_token": token, "queue": "no spaces"}).status_code == 400


def test_a_worker_request_is_taken_once_by_its_daemon_and_forgotten_if_nobody_takes_it(client, app, db):
    worker_requests.ask(db, "host:1", "drain")
    worker_requests.ask(db, "host:2", "stop")
    with pytest.raises(InvalidField):
        worker_requests.ask(db, "host:1", "explode")
    assert worker_requests.take(db, {"host:1", "host:9"}) == [("host:1", "drain")]
    assert worker_requests.take(db, {"host:1"}) == []
    assert worker_requests.take(db, set(), now=time.time() + worker_requests.FORGET + 1) == []
    assert db.execute("SELECT count(*) FROM worker_requests")[0][0] == 0
    # The page refuses a worker the daemon does not report (here: no daemon at all).
    operator(client, app)
    token = csrf(client.get("/ui/workers"))
    assert client.post("/ui/workers/123/drain", data={"csrf_token": token}).status_code == 404


def test_the_database_panel_says_size_backups_and_time_to_drain(client, app, db, config):
    operator(client, app)
    queue = QueueManager("jobs", db, config)
    now = time.time() + 1  # every task enqueued below is due by then
    queue.enqueue_many([{"task": "t", "payload": i} for i in range(30)])
    history.record(db, config, now=now - 120)
    for _ in range(6):  # 6 tasks done in the last minutes: 30 - 6 = 24 wait, at 6 per 2 minutes
        queue.complete_task(queue.dequeue("w").id, "w", None)
    history.record(db, config, now=now - 60)
    history.record(db, config, now=now)
    report = reports.database(db, config, now=now)
    assert report["backlog"]["ready"] == 24 and report["backlog"]["rate_per_second"] == 0.05
    assert report["backlog"]["drain_seconds"] == 480.0
    assert report["size_bytes"] > 0 and report["disk"]["free_bytes"] > 0
    if db.engine == "sqlite":
        assert report["last_backup"] is None and report["wal_bytes"] >= 0
        create_backup(db, config)
        assert reports.database(db, config)["last_backup"]["name"].startswith("oos-")
    page = client.get("/ui/database").get_data(as_text=True)
    assert "Time to drain" in page and "8 min" in page and "24 tasks ready" in page


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

    done = subprocess.run([sys.executable, "-m", "oos_cli", "token", "--read-only"], env=subprocess_env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token == (config.data_dir / "api_readonly_token").read_text().strip() and len(token) > 30


def test_logging_out_ends_the_login_for_a_copied_cookie_too_and_a_new_token_ends_viewers(client, app, config, tmp_path):
    operator(client, app)
    copied = client.get_cookie("oos_session").value
    thief = app.test_client()
    thief.set_cookie("oos_session", copied)
    assert thief.get("/ui/").status_code == 200, "the copy works while the login lasts"
    page = client.get("/ui/")
    assert client.post("/ui/logout", data={"csrf_token": csrf(page)}).status_code == 302
    assert thief.get("/ui/").status_code == 302, "logged out on the server: the copy opens nothing"
    # A viewer logged in with the read-only token is logged out when that token changes
    # (SIGHUP reloads the config, here a new config given to the running app).
    viewer = app.test_client()
    assert login(viewer, "r" * 32).status_code == 302 and viewer.get("/ui/").status_code == 200
    app.extensions["oos"]["config"] = config.replace(api_readonly_token="s" * 32)
    assert viewer.get("/ui/").status_code == 302
    assert login(viewer, "r" * 32).status_code == 401 and login(viewer, "s" * 32).status_code == 302


def test_run_now_from_the_task_page_and_the_api_and_a_replay_shows_its_line(client, app, db, config):
    operator(client, app)
    queue = QueueManager("jobs", db, config)
    later = int(queue.enqueue("t", delay=3600))
    page = client.get(f"/ui/tasks/{later}")
    assert "Run now" in page.get_data(as_text=True)
    assert client.post(f"/ui/tasks/{later}/run-now", data={"csrf_token": csrf(page)}).status_code == 302
    assert queue.get_task(later).run_at <= time.time() + 1 and "Run now" not in client.get(f"/ui/tasks/{later}").get_data(as_text=True)
    last = db.execute("SELECT action, target FROM audit_log ORDER BY id DESC LIMIT 1")[0]
    assert (last["action"], last["target"]) == ("run-now", f"task {later}")
    auth = {"Authorization": f"Bearer {app.extensions['oos']['token']}"}
    again = int(queue.enqueue("t", delay=60))
    assert client.post(f"/api/v1/tasks/{again}/run-now", headers=auth).get_json()["outcome"] == "due now"
    refused = client.post(f"/api/v1/tasks/{again}/run-now", headers=auth)
    assert refused.status_code == 409 and "not waiting" in refused.get_json()["error"]["message"]
    assert client.post("/api/v1/tasks/999999/run-now", headers=auth).status_code == 404
    # A replayed task's history says where its new attempts start.
    dead = int(queue.enqueue("d", max_attempts=1))
    while (task := queue.dequeue("w")) and task.id != dead:
        queue.complete_task(task.id, "w", None)
    queue.fail_task(dead, "w", "first life", attempt=1)
    queue.retry_dead(dead)
    assert "replayed" in client.get(f"/ui/tasks/{dead}").get_data(as_text=True)


def test_actions_on_selected_rows_and_an_enqueue_from_the_queues_page(client, app, db, config):
    operator(client, app)
    queue = QueueManager("jobs", db, config)
    ids = [int(queue.enqueue("t", {"n": i}, max_attempts=1)) for i in range(4)]
    for _ in ids:
        queue.fail_task(queue.dequeue("w").id, "w", "boom", retry=False)
    token = csrf(client.get("/ui/dead"))
    assert 'form="selected"' in client.get("/ui/dead").get_data(as_text=True)
    replayed = client.post("/ui/selected/retry", data={"csrf_token": token, "ids": [ids[0], ids[1]]})
    assert replayed.status_code == 302 and [queue.get_task(i).state for i in ids] == ["queued", "queued", "dead", "dead"]
    assert client.post("/ui/selected/purge", data={"csrf_token": token, "ids": [ids[2]]}).status_code == 302
    assert queue.get_task(ids[2]) is None and queue.get_task(ids[3]).state == "dead"
    assert client.post("/ui/selected/cancel", data={"csrf_token": token, "ids": [ids[0], ids[1]]}).status_code == 302
    assert [queue.get_task(i).state for i in ids[:2]] == ["cancelled", "cancelled"]
    for bad in ({}, {"ids": ["x"]}, {"ids": list(range(1, 502))}):
        assert client.post("/ui/selected/cancel", data={"csrf_token": token, **bad}).status_code == 400
    assert client.post("/ui/selected/explode", data={"csrf_token": token, "ids": [ids[3]]}).status_code == 404
    actions = [r["action"] for r in db.execute("SELECT action FROM audit_log ORDER BY id")]
    assert actions[-3:] == ["retry selected", "purge selected", "cancel selected"]

    # Enqueue from the Queues page: checked as the API checks it; audited without the payload.
    made = client.post("/ui/enqueue", data={"csrf_token": token, "queue": "mail", "task": "send",
                                            "payload": '{"to": "ann@example.org"}', "priority": "3", "delay": "60"})
    assert made.status_code == 302
    task = queues_of(db, config, "mail")[0]
    assert (task.name, task.payload, task.priority) == ("send", {"to": "ann@example.org"}, 3) and task.run_at > time.time()
    last = db.execute("SELECT action, target, detail FROM audit_log ORDER BY id DESC LIMIT 1")[0]
    assert (last["action"], last["target"]) == ("enqueue", "queue mail") and "ann@" not in last["detail"]
    for form, problem in (({"payload": "{oops"}, "payload: not JSON"), ({"queue": "no spaces"}, "queue:"),
                          ({"priority": "high"}, "priority or delay:"), ({"task": ""}, "task:"),
                          ({"delay": "-5"}, "delay: must be >= 0")):
        refused = client.post("/ui/enqueue", data={"csrf_token": token, "queue": "mail", "task": "send", **form})
        assert refused.status_code == 400 and problem in html.unescape(refused.get_data(as_text=True)), form
    assert len(queues_of(db, config, "mail")) == 1  # nothing half-written


def queues_of(db, config, name):
    return [QueueManager(name, db, config).get_task(r["id"]) for r in db.execute(
        "SELECT id FROM tasks WHERE queue = ? ORDER BY id", (name,))]
