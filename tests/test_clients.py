"""Real clients against the running daemon: a client generated from ``/api/v1/openapi.json``
(openapi-python-client, as a user of another language's generator would) with strict status
checking, and a standard SSE client library (httpx-sse) reading a reply's stream and a failed
reply's stream, with the assistant talking to the local fake remote."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import httpx
import pytest
import requests
from httpx_sse import connect_sse

from tests.daemon import ROOT, wait_for
from tests.test_assistant_api import assistant_served

pytestmark = pytest.mark.slow
BIN = ROOT / ".venv" / "bin"


@pytest.fixture
def served(data_dir, tmp_path, remotes):
    with assistant_served(data_dir, tmp_path, remotes, "") as (base, auth):
        yield base.removesuffix("/api/v1/assistant"), auth


def generated_client(base: str, tmp_path):
    """The package openapi-python-client makes from the served document, imported."""
    (tmp_path / "openapi.json").write_text(requests.get(f"{base}/api/v1/openapi.json", timeout=10).text)
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")  # it formats its output with ruff
    done = subprocess.run([str(BIN / "openapi-python-client"), "generate", "--path", "openapi.json", "--meta", "none",
                           "--output-path", "oos_client"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module("oos_client")
    finally:
        sys.path.remove(str(tmp_path))


def test_a_generated_client_makes_the_main_calls_with_strict_status_checks(served, tmp_path):
    base, auth = served
    oos = generated_client(base, tmp_path)
    from oos_client.api.queues import enqueue, status
    from oos_client.api.tasks import browse, cancel_task, get_task, why
    from oos_client.models import TaskIn

    client = oos.AuthenticatedClient(base_url=base, token=auth["Authorization"].removeprefix("Bearer "),
                                     raise_on_unexpected_status=True)
    made = enqueue.sync(name="default", client=client, body=TaskIn(task="noop", payload={"n": 1}))
    task_id = made.ids[0]
    done = wait_for(lambda: (t := get_task.sync(task_id=task_id, client=client)).state == "succeeded" and t, 30,
                    what="the task to run")
    assert done.result == {"ok": True} and done.attempts == 1
    later = enqueue.sync(name="default", client=client, body=TaskIn(task="noop", delay=3600.0))
    assert [b["reason"] for b in why.sync(task_id=later.ids[0], client=client).blockers] == ["scheduled"]
    assert cancel_task.sync(task_id=later.ids[0], client=client).outcome == "cancelled"
    queues = {q.queue: q for q in status.sync(client=client).queues}
    assert queues["default"].counts["succeeded"] == 1
    assert [t.id for t in browse.sync(client=client, queue="default").items] == [later.ids[0], task_id]
    # A 404 is an answer the document names: the client returns it, parsed, and does not raise.
    missing = get_task.sync_detailed(task_id=999_999, client=client)
    assert missing.status_code == 404 and missing.parsed.error.message == "no task 999999"


def events(base: str, auth: dict, sid: str, mid: int) -> list:
    url = f"{base}/api/v1/assistant/sessions/{sid}/messages/{mid}/stream"
    with httpx.Client(headers=auth, timeout=30) as http, connect_sse(http, "GET", url) as source:
        assert source.response.status_code == 200
        return list(source.iter_sse())


def test_a_standard_sse_client_reads_a_reply_and_a_failed_reply(served, remotes):
    base, auth = served
    api = f"{base}/api/v1/assistant"
    sid = requests.post(f"{api}/sessions", json={}, headers=auth, timeout=10).json()["id"]
    remotes.script("openai", ("ok", "Paris is the capital of France."))
    mid = requests.post(f"{api}/sessions/{sid}/messages", json={"content": "Capital?"}, headers=auth,
                        timeout=10).json()["message_id"]
    got = events(base, auth, sid, mid)
    assert [e.event for e in got[:-1]] == ["token"] * (len(got) - 1) and got[-1].event == "done"
    assert "".join(e.json()["text"] for e in got[:-1]) == got[-1].json()["content"]
    assert all(e.id for e in got) and got[0].retry  # the first real event carries retry:
    # The provider fails: the stream ends with a "failed" event, with an id (no reconnect loop).
    remotes.script("openai", *[("status", 500)] * 50)  # every attempt of the reply task
    failed_mid = requests.post(f"{api}/sessions/{sid}/messages", json={"content": "again?"}, headers=auth,
                               timeout=10).json()["message_id"]
    ended = events(base, auth, sid, failed_mid)
    assert ended[-1].event == "failed" and ended[-1].id, ended
    assert "all providers failed" in ended[-1].json()["error"], ended[-1].data
    # Reconnecting after the end is a 204: a standard client stops there.
    with httpx.Client(headers=dict(auth, **{"Last-Event-ID": ended[-1].id}), timeout=30) as http:
        again = http.get(f"{api}/sessions/{sid}/messages/{failed_mid}/stream")
    assert again.status_code == 204
