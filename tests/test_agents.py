"""Replies streamed to clients (server-sent events, resumed with Last-Event-ID) and plans of
agents, end to end through a daemon whose providers are a real local HTTP server speaking the
OpenAI wire format (tests/fake_remotes.py)."""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import threading

import pytest
import requests

from api.app import create_app
from helpers.database_config import DatabaseManager
from lib import plans, tools
from lib.assistant import Assistant
from lib.llm_providers import OpenAICompatible, ProviderChain, Reply
from lib.stream import ReplyStream, events_after, prune
from tests.daemon import wait_for
from tests.test_assistant_api import assistant_served

pytestmark = pytest.mark.both_engines


def read_events(response, stop_after=None):
    """The SSE events of ``response`` as dicts (id, event, data), until the stream ends, or
    until ``stop_after(events)`` says so."""
    events, current = [], {}
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if "event" in current or "data" in current:
                current["data"] = json.loads(current.get("data", "null"))
                events.append(current)
                if stop_after and stop_after(events):
                    break
            current = {}
        elif line.startswith(":") or line.startswith("retry:"):
            continue
        else:
            key, _, value = line.partition(": ")
            current[key] = int(value) if key == "id" else value
    return events


def text_of(events) -> str:
    """What a client shows: the text pieces, less those a ``restart`` withdrew."""
    pieces: list[str] = []
    for e in events:
        if e["event"] == "token":
            pieces.append(e["data"]["text"])
        elif e["event"] == "restart":
            while pieces and pieces[-1] is not None:
                pieces.pop()
        elif e["event"] in ("tool_call", "tool_result", "plan"):
            pieces.append(None)
    return "".join(p for p in pieces if p)


def stream(base, auth, sid, mid, last_id=None, **kw):
    headers = dict(auth, **({"Last-Event-ID": str(last_id)} if last_id is not None else {}))
    return requests.get(f"{base}/sessions/{sid}/messages/{mid}/stream", headers=headers, stream=True,
                        timeout=60, **kw)


@pytest.mark.slow
def test_a_reply_streams_as_it_is_written_and_resumes_after_a_disconnect(data_dir, tmp_path, remotes,
                                                                          database_url):
    """The model writes half its answer and pauses: the client already has those pieces while
    the reply is still pending (streamed, not sent at the end). It disconnects and reconnects
    with Last-Event-ID, and the model finishes: every piece once, in order, equal to the stored
    reply. One stream at a time is allowed, so each reconnect also shows that the server freed
    the permit of the connection the client dropped."""
    words = "one two three four five six seven eight nine ten"
    gate = threading.Event()
    try:
        with assistant_served(data_dir, tmp_path, remotes, database_url, OOS_ASSISTANT_MAX_STREAMS="1") as (base, auth):
            sid = requests.post(f"{base}/sessions", json={}, headers=auth, timeout=10).json()["id"]
            remotes.script("openai", ("gated", words, gate))
            mid = requests.post(f"{base}/sessions/{sid}/messages", json={"content": "count to ten"}, headers=auth,
                                timeout=10).json()["message_id"]

            def reconnect(last_id=None):  # 429 until the server notices the dropped connection
                def answered():
                    response = stream(base, auth, sid, mid, last_id)
                    if response.status_code == 429:
                        response.close()
                        return None
                    return response
                return wait_for(answered, 30, interval=0.2, what="the dropped stream's permit back")

            with reconnect() as first:
                assert first.headers["Content-Type"].startswith("text/event-stream")
                seen = read_events(first, stop_after=lambda ev: len(ev) == 3)
            with reconnect(seen[-1]["id"]) as second:
                more = read_events(second, stop_after=lambda ev: len(ev) == 2)  # the rest of the first half
            assert [e["event"] for e in seen + more] == ["token"] * 5
            pending = requests.get(f"{base}/sessions/{sid}/messages", headers=auth, timeout=10).json()["items"]
            assert [m["role"] for m in pending] == ["user"] and pending[0]["reply_status"] == "pending"
            gate.set()
            with reconnect(more[-1]["id"]) as third:
                rest = read_events(third)
            events = seen + more + rest
            ids = [e["id"] for e in events]
            assert ids == sorted(set(ids)), "no event twice, in order"
            assert events[-1]["event"] == "done" and [e["event"] for e in events[:-1]] == ["token"] * 10
            stored = requests.get(f"{base}/sessions/{sid}/messages", headers=auth, timeout=10).json()["items"][-1]
            assert text_of(events) == events[-1]["data"]["content"] == stored["content"] == words + " "
            assert events[-1]["data"]["reply_id"] == stored["id"]
            # A stream opened after the reply gives it all again; from the reply's id, the same.
            with stream(base, auth, sid, stored["id"]) as again:
                assert [e["id"] for e in read_events(again)] == ids
            # Reconnecting after done: 204, which tells an EventSource to stop.
            with stream(base, auth, sid, mid, last_id=ids[-1]) as finished:
                assert finished.status_code == 204
            # A provider's stream that breaks half-way: the retry's text replaces it (restart).
            remotes.script("openai", ("cut",), ("ok", "whole answer here"))
            mid = requests.post(f"{base}/sessions/{sid}/messages?wait=30", json={"content": "again"}, headers=auth,
                                timeout=60).json()["message_id"]
            with stream(base, auth, sid, mid) as cut:
                events = read_events(cut)
            kinds = [e["event"] for e in events]
            assert "restart" in kinds and kinds[-1] == "done" and kinds.index("restart") > 0
            assert text_of(events) == "whole answer here "
    finally:
        gate.set()


@pytest.mark.slow
def test_tool_calls_and_results_are_in_the_stream(data_dir, tmp_path, remotes, database_url):
    """A reply that calls a tool first: the call and its result are in the stream, and the
    model's second call (by assistant.continue) still has the web search results the message
    asked for."""
    with assistant_served(data_dir, tmp_path, remotes, database_url, OOS_ASSISTANT_TOOLS="queue_status",
                          OOS_SEARCH_BASE_URL=remotes.url + "/customsearch/v1", GOOGLE_SEARCH_API_KEY="g",
                          GOOGLE_SEARCH_ENGINE_ID="e") as (base, auth):
        sid = requests.post(f"{base}/sessions", json={}, headers=auth, timeout=10).json()["id"]
        remotes.script("openai", ("tool", "queue_status", {}), ("ok", "All quiet."))
        mid = requests.post(f"{base}/sessions/{sid}/messages", json={"content": "how are the queues?",
                                                                     "use_search": True},
                            headers=auth, timeout=10).json()["message_id"]
        with stream(base, auth, sid, mid) as response:
            events = read_events(response)
        assert [e["event"] for e in events] == ["tool_call", "tool_result", "token", "token", "done"]
        assert events[0]["data"]["name"] == "queue_status"
        assert events[1]["data"]["tool_call_id"] == events[0]["data"]["id"]
        assert "assistant" in json.loads(events[1]["data"]["content"])
        assert text_of(events) == "All quiet. "
        systems = [r["body"]["messages"][0]["content"] for r in remotes.seen("openai")]
        assert len(systems) == 2 and all("how are the queues? result 0" in text for text in systems)


def test_stream_limits_and_bad_input(config, db):
    app = create_app(config.replace(assistant_max_streams=1))
    client, auth = app.test_client(), {"Authorization": f"Bearer {app.extensions['oos']['token']}"}
    a = Assistant(config, db)
    sid = a.create_session()["id"]
    mid = a.post_message(sid, "hello")["message_id"]
    url = f"/api/v1/assistant/sessions/{sid}/messages/{mid}/stream"
    for header in ("abc", "\u00b2", "9" * 5000, "-1"):
        bad = client.get(url, headers=dict(auth, **{"Last-Event-ID": header}))
        assert bad.status_code == 400 and bad.get_json()["error"]["field"] == "Last-Event-ID", header
    assert client.get(url + "?after=-1", headers=auth).get_json()["error"]["field"] == "after"
    missing = client.get(f"/api/v1/assistant/sessions/{sid}/messages/{mid + 99}/stream", headers=auth)
    assert missing.status_code == 404 and "no message" in missing.get_json()["error"]["message"]
    assert client.get(url).status_code == 401
    held = client.get(url, headers=auth)  # not read yet: it holds the one permit
    refused = client.get(url, headers=auth)
    assert refused.status_code == 429 and "streams are open" in refused.get_json()["error"]["message"]
    held.close()
    again = client.get(url, headers=auth)
    assert again.status_code == 200
    again.close()
    plan = client.get(f"/api/v1/assistant/sessions/{sid}/messages/{mid}/plan", headers=auth)
    assert plan.status_code == 404 and "no plan" in plan.get_json()["error"]["message"]


def test_the_rules_planner_splits_lists_sentences_and_ands():
    assert [s["task"] for s in plans.by_rules("1. Find flights\n2. Find hotels\n- Rent a car", 4)] == \
        ["Find flights", "Find hotels", "Rent a car"]
    assert [s["task"] for s in plans.by_rules("Compare Python and Go. Which is faster?", 4)] == \
        ["Compare Python and Go.", "Which is faster?"]
    assert [s["task"] for s in plans.by_rules("Summarize the logs, find errors and suggest fixes", 4)] == \
        ["Summarize the logs", "find errors", "suggest fixes"]
    assert [s["task"] for s in plans.by_rules("a. b. c. d. e.", 3)] == ["a.", "b.", "c. d. e."]
    assert plans.by_rules("hello", 3) == [{"role": "an assistant", "task": "hello"}]
    # The new user's two (issue 27): an inline numbered list keeps what it is for; a list of
    # nouns under one verb is one task, not "Compare Python" | "Rust" | "Go for web servers".
    trip = plans.by_rules("Plan a weekend trip: 1. pick a city in Europe 2. suggest a hotel 3. list three things to do", 4)
    assert [s["task"] for s in trip] == ["Plan a weekend trip: pick a city in Europe", "Plan a weekend trip: suggest a hotel",
                                         "Plan a weekend trip: list three things to do"]
    assert [s["role"] for s in trip] == ["agent 1 of 3", "agent 2 of 3", "agent 3 of 3"]
    assert plans.by_rules("Compare Python, Rust and Go for web servers", 4) == \
        [{"role": "an assistant", "task": "Compare Python, Rust and Go for web servers"}]
    assert plans.parse('{"steps": [{"role": "a cook", "task": "bake"}]}', 3) == [{"role": "a cook", "task": "bake"}]
    assert plans.parse('```json\n{"steps": [{"task": "bake"}]}\n```', 3) == [{"role": "an assistant", "task": "bake"}]
    for bad in ("no json", '{"steps": []}', '{"steps": [{"role": "x"}]}', "[1]"):
        assert plans.parse(bad, 3) is None


@pytest.mark.slow
def test_a_three_agent_plan_survives_a_worker_killed_mid_plan(data_dir, tmp_path, remotes, database_url, db):
    """The planner splits the request into three agents; the worker running one of them is
    SIGKILLed while that agent waits for the model. The plan goes on: the killed step runs
    again (and only it), the join writes the answer from all three replies, each step
    shows its reply, and the planner was asked once."""
    held = threading.Event()
    plan = {"steps": [{"role": "a flight finder", "task": "Find flights to Lisbon"},
                      {"role": "a hotel finder", "task": "Find hotels in Lisbon"},
                      {"role": "a weather reader", "task": "Say what the weather in Lisbon is like in May"}]}

    def finding(body):
        return f"finding for {body['messages'][-1]['content']}"

    def joined(body):
        return "JOINED " + " | ".join(re.findall(r"finding for ([^\n]+)", body["messages"][-1]["content"]))

    env = {"OOS_WORKERS_MIN": "3", "OOS_WORKERS_MAX": "3"}
    try:
        with assistant_served(data_dir, tmp_path, remotes, database_url, **env) as (base, auth):
            sid = requests.post(f"{base}/sessions", json={"user_id": "ann"}, headers=auth, timeout=10).json()["id"]
            remotes.script("openai", ("ok", json.dumps(plan)), ("hold", held), ("ok", finding), ("ok", finding),
                           ("ok", finding), ("ok", joined))
            mid = requests.post(f"{base}/sessions/{sid}/messages", json={"content": "Plan my trip to Lisbon in May",
                                                                         "plan": True},
                                headers=auth, timeout=10).json()["message_id"]

            def one_agent_left():
                rows = db.execute("SELECT state, worker FROM tasks WHERE name = 'assistant.agent'")
                running = [r["worker"] for r in rows if r["state"] == "running"]
                done = [r for r in rows if r["state"] == "succeeded"]
                return running[0] if len(rows) == 3 and len(done) == 2 and len(running) == 1 else None

            holder = wait_for(one_agent_left, 60, interval=0.1, what="two agents done, one waiting for the model")
            view = requests.get(f"{base}/sessions/{sid}/messages/{mid}/plan", headers=auth, timeout=10).json()
            assert view["state"] == "running" and sorted(s["state"] for s in view["steps"]) == ["done", "done", "running"]
            os.kill(int(holder.rsplit(":", 1)[1]), signal.SIGKILL)

            def answered():
                items = requests.get(f"{base}/sessions/{sid}/messages", headers=auth, timeout=10).json()["items"]
                return items if items[0]["reply_status"] != "pending" else None

            items = wait_for(answered, 90, interval=0.2, what="the plan's answer")
            assert items[0]["reply_status"] == "complete" and items[0]["plan"] is True, items[0]
            reply = items[-1]["content"]
            for step in plan["steps"]:
                assert step["task"] in reply, reply
            view = requests.get(f"{base}/sessions/{sid}/messages/{mid}/plan", headers=auth, timeout=10).json()
            assert view["state"] == "done" and view["planner"] == "model" and view["reply_id"] == items[-1]["id"]
            assert [s["state"] for s in view["steps"]] == ["done"] * 3
            assert sorted(s["attempts"] for s in view["steps"]) == [1, 1, 2]
            assert [s["role"] for s in view["steps"]] == [s["role"] for s in plan["steps"]]
            for step in view["steps"]:
                assert step["reply"] == f"finding for {step['instruction']} "
                agent = requests.get(f"{base}/sessions/{step['session_id']}/messages", headers=auth, timeout=10).json()
                assert [m["role"] for m in agent["items"]] == ["user", "assistant"]
            sent = [r["body"] for r in remotes.seen("openai")]
            assert sum(1 for b in sent if b["messages"][0]["content"].startswith("You plan work")) == 1
            assert len(sent) == 6  # planner, three agents, the killed agent's retry, the join
            assert "You are a hotel finder" in next(b for b in sent if "hotels" in b["messages"][-1]["content"]
                                                    )["messages"][0]["content"]
            with stream(base, auth, sid, mid) as response:
                events = read_events(response)
            assert events[0]["event"] == "plan" and len(events[0]["data"]["steps"]) == 3
            assert events[-1]["event"] == "done" and text_of(events) == reply
    finally:
        held.set()


def test_stream_events_are_pruned_after_their_keep_time_and_the_reply_stays(db, config):
    a = Assistant(config, db, clock=lambda: 1000.0)
    sid = a.create_session()["id"]
    mid = a.post_message(sid, "hello")["message_id"]
    writer = ReplyStream(db, mid, clock=lambda: 1000.0)
    writer.attempt()
    writer.text("Hel")
    assert ReplyStream(db, mid).dirty, "a new writer finds text of an unfinished try"
    writer.text("lo")
    with db.transaction() as conn:
        conn.execute("INSERT INTO assistant_messages (session_id, role, content, reply_to, created_at) "
                     "VALUES (?, 'assistant', 'Hello', ?, 1000)", (sid, mid))
        writer.write("done", {"content": "Hello"}, conn)
    assert [e[1] for e in events_after(db, mid, 0)] == ["token", "token", "done"] and not writer.dirty
    prune(db, config, 1000.0 + config.assistant_stream_keep_seconds - 1)
    assert len(events_after(db, mid, 0)) == 3
    prune(db, config, 1000.0 + config.assistant_stream_keep_seconds + 1)
    assert events_after(db, mid, 0) == [] and a.reply_to(mid)["content"] == "Hello"
    assert a.stream_end(mid) == ("done", {"reply_id": a.reply_to(mid)["id"], "provider": None, "content": "Hello"})


def test_the_github_tool_reads_repos_and_issues_only_when_a_token_is_set(remotes, config, db, monkeypatch):
    config = config.replace(assistant_tools=("github", "recall"), assistant_github_base_url=remotes.url + "/github")
    session = {"id": "s", "user_id": None}
    monkeypatch.delenv("GITHUB_PAT", raising=False)
    assert [t["name"] for t in tools.specs(config)] == ["recall"], "not offered without GITHUB_PAT"
    with pytest.raises(tools.ToolError, match="GITHUB_PAT is not set"):
        tools.run("github", {"action": "repo", "repo": "acme/widgets"}, session, config, db)
    monkeypatch.setenv("GITHUB_PAT", "ghp_secret")
    assert [t["name"] for t in tools.specs(config)] == ["github", "recall"]
    repo = json.loads(tools.run("github", {"action": "repo", "repo": "acme/widgets"}, session, config, db))
    assert repo["full_name"] == "acme/widgets" and repo["stargazers_count"] == 42
    issue = json.loads(tools.run("github", {"action": "issue", "repo": "acme/widgets", "number": 7}, session,
                                 config, db))
    assert issue["title"] == "Crash on start" and issue["body"].startswith("It crashes") and \
        issue["comments"] == [{"user": "bob", "body": "Same here."}]
    listed = json.loads(tools.run("github", {"action": "issues", "repo": "acme/widgets", "state": "all"}, session,
                                  config, db))
    assert [i["number"] for i in listed] == [7] and listed[0]["labels"] == ["bug"]
    remotes.script("github", ("status", 502))  # a retry gets past it
    found = json.loads(tools.run("github", {"action": "search_issues", "query": "crash", "repo": "acme/widgets"},
                                 session, config, db))
    assert [i["number"] for i in found] == [7]
    seen = remotes.seen("github")
    assert seen[-1]["body"]["query"]["q"] == ["crash repo:acme/widgets"]
    assert all(r["headers"]["Authorization"] == "Bearer ghp_secret" for r in seen)
    for arguments, problem in (({"action": "delete_repo", "repo": "acme/widgets"}, "action: expected one of"),
                               ({"action": "repo", "repo": "../etc"}, "repo: expected owner/name"),
                               ({"action": "issue", "repo": "acme/widgets", "number": "x"}, "number: expected"),
                               ({"action": "search_issues", "query": "x", "repo": "acme"}, "repo: expected owner/name"),
                               ({"action": "repo", "repo": "acme/nothing"}, "GitHub has no repos/acme/nothing")):
        with pytest.raises(tools.ToolError, match=problem):
            tools.run("github", arguments, session, config, db)
    assert "ghp_secret" not in json.dumps(seen[-1]["body"])


def test_a_reply_whose_tool_step_died_is_failed_not_pending(db, config):
    """The reply task succeeded by handing over to its tools; the step's continue task then
    died: the message says failed, with the reason, and its stream ends with that error. (A
    page to fetch is a task on the browser queue, whose limits bound the browsers.)"""
    a = Assistant(config, db)
    sid = a.create_session()["id"]
    mid = a.post_message(sid, "how are the queues?")["message_id"]
    message = dict(db.execute("SELECT * FROM assistant_messages WHERE id = ?", (mid,))[0])
    a._run_tools(message, Reply("", "openai", "m", "tool_calls", tool_calls=[
        {"id": "c1", "name": "queue_status", "arguments": {}},
        {"id": "c2", "name": "fetch_page", "arguments": {"url": "https://example.org/"}}]), ReplyStream(db, mid))
    assert sorted((r[0], r[1]) for r in db.execute("SELECT name, queue FROM tasks WHERE name LIKE 'assistant.%' "
                                                   "AND name <> 'assistant.reply'")) == [
        ("assistant.continue", "assistant"), ("assistant.tool", "assistant"), ("assistant.tool", "browser")]
    assert a.messages(sid)[0]["reply_status"] == "pending" and a.failure(mid) is None
    db.execute("UPDATE tasks SET state = 'dead', last_error = 'all providers failed: openai: HTTP 500' "
               "WHERE name = 'assistant.continue'")
    assert a.messages(sid)[0]["reply_status"] == "failed"
    assert a.failure(mid) == "all providers failed: openai: HTTP 500"
    assert a.stream_end(mid) == ("failed", {"error": "all providers failed: openai: HTTP 500"})


def test_agents_draw_no_memories_and_go_with_their_session(db, config, remotes, monkeypatch):
    """An agent's message is the planner's words: no memory is drawn from it, not when it is
    answered, nor when its task runs again after the answer was stored; a message of the user
    is (the control). Deleting the user's session deletes its agents too."""
    a = Assistant(config.replace(assistant_providers=("openai",), assistant_extract_memories=True,
                                 assistant_openai_base_url=remotes.url + "/v1"), db)
    sid = a.create_session(user_id="ann")["id"]
    mid = a.post_message(sid, "I like tea. Find a tea shop. Find a tea pot.", plan=True)["message_id"]
    message = dict(db.execute("SELECT *, NULL AS preferred, 'ann' AS user_id FROM assistant_messages WHERE id = ?",
                              (mid,))[0])
    plans.start(a, message, ProviderChain([], db))
    agent = db.execute("SELECT session_id, agent_message_id FROM assistant_plan_steps WHERE position = 0")[0]
    remotes.script("openai", ("ok", "I like green tea too."))
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    a.reply(agent["agent_message_id"], agent=True)
    assert a.reply_to(agent["agent_message_id"])["content"].startswith("I like green tea")
    assert "tools" not in remotes.seen("openai")[-1]["body"]
    a.reply(agent["agent_message_id"], agent=True)  # its task again, after the reply was stored
    assert db.execute("SELECT count(*) FROM tasks WHERE name = 'assistant.extract'")[0][0] == 0
    own = a.post_message(a.create_session(user_id="bob")["id"], "I like coffee.")["message_id"]
    remotes.script("openai", ("ok", "Coffee it is."))
    a.reply(own)
    assert db.execute("SELECT count(*) FROM tasks WHERE name = 'assistant.extract'")[0][0] == 1
    a.delete_session(sid)
    assert db.execute("SELECT count(*) FROM assistant_sessions WHERE user_id = 'ann'")[0][0] == 0
    assert db.execute("SELECT count(*) FROM assistant_messages WHERE content LIKE '%tea%'")[0][0] == 0


@pytest.mark.sqlite_only  # its own SQLite file: dropping a table there is the failure
def test_a_stream_that_cannot_be_written_is_a_database_error_not_the_providers(tmp_path, remotes):
    """Writing the text fails (here: the events table is gone): the call fails with the
    database's error, to be retried as a task, and the provider is not blamed for it."""

    db = DatabaseManager(tmp_path / "oos.db")
    stream_ = ReplyStream(db, 1)
    db.execute("DROP TABLE reply_events")
    chain = ProviderChain([OpenAICompatible("openai", remotes.url + "/v1", "m", ["k"])], db, attempts=1)
    remotes.script("openai", ("ok", "some words"))
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        chain.chat([{"role": "user", "content": "hi"}], 10, stream=stream_)
    assert db.execute("SELECT count(*) FROM provider_stats WHERE name = 'openai' AND errors > 0")[0][0] == 0
    db.close()


def test_a_failed_replys_stream_ends_with_a_failed_event_with_an_id_and_a_reconnect_is_204(config, db):
    """A standard EventSource reconnected forever after the old final ``error`` event (no id,
    and a name EventSource keeps for its own connection errors)."""
    app = create_app(config)
    client, auth = app.test_client(), {"Authorization": f"Bearer {app.extensions['oos']['token']}"}
    a = Assistant(config, db)
    sid = a.create_session()["id"]
    mid = a.post_message(sid, "hello")["message_id"]
    db.execute("UPDATE tasks SET state = 'dead', last_error = 'all providers failed' WHERE name = 'assistant.reply'")
    url = f"/api/v1/assistant/sessions/{sid}/messages/{mid}/stream"
    body = client.get(url, headers=dict(auth, **{"Last-Event-ID": ""})).get_data(as_text=True)  # empty: no id
    assert body.startswith("retry: 1000\nid: "), "the reconnect delay comes with the first event"
    block = body.strip().split("\n\n")[-1]
    fields = dict(line.split(": ", 1) for line in block.splitlines())
    assert fields["event"] == "failed" and json.loads(fields["data"]) == {"error": "all providers failed"}
    again = client.get(url, headers=dict(auth, **{"Last-Event-ID": fields["id"]}))
    assert again.status_code == 204
