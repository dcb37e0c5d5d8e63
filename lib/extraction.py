"""Memories from the conversation: after each reply, what the user said about themselves.

The ``assistant.extract`` task (enqueued once per answered message) asks a remote model for the
facts and preferences the user stated, in a strict JSON format; the embedded model cannot do
that reliably, so without a remote provider (or when the answer is not that JSON) a few
English patterns do it instead ("my name is", "I like", "I live in", "call me", "please
always"). A memory whose text is already stored for that user or session is not stored again.
"""
from __future__ import annotations

import re

from helpers.config import Config, load_config
from helpers.engine import get_database
from helpers.tasks import task
from helpers.validation import ASSISTANT_QUEUE, STATED_MEMORY_TYPES
from lib.llm_providers import AllProvidersFailed, ProviderChain, json_answer, providers_from_config
from lib.memory import Memories

KINDS = STATED_MEMORY_TYPES
PROMPT = """From the user's message below, list the facts and preferences the user stated about
themselves, each as a short sentence about "the user". Answer with JSON only, exactly:
{"memories": [{"type": "fact" or "preference" or "instruction", "content": "..."}]}
and {"memories": []} if there are none."""
_END = r"([^.!?\n,;]{2,80})"
PATTERNS = [  # (pattern, type, the memory's text from the pattern's groups)
    # The lead-in in any case ("My name is", "Call me" at a sentence's start), the name itself
    # capitalised, so "my name is Alice and I like tea" stops at the name.
    (r"(?i:\bmy name is) ([A-Z][\w'-]*(?: [A-Z][\w'-]*)*)", "fact", "The user's name is {}."),
    (r"(?i:\bcall me) ([A-Z][\w'-]*)", "preference", "The user wants to be called {}."),
    (r"(?i)\bI (?:really )?(?:like|love|enjoy) " + _END, "preference", "The user likes {}."),
    (r"(?i)\bI prefer " + _END, "preference", "The user prefers {}."),
    (r"(?i)\bI (?:hate|dislike|don't like|do not like) " + _END, "preference", "The user does not like {}."),
    (r"(?i)\bI live in " + _END, "fact", "The user lives in {}."),
    (r"(?i)\bI work ((?:as|at|for) [^.!?\n,;]{2,80})", "fact", "The user works {}."),
    (r"(?i)\bplease ((?:always|never) [^.!?\n,;]{2,80})", "instruction", "{}."),
]


def by_rules(text: str) -> list[dict]:
    """The memories the patterns find in ``text``."""
    found = []
    for pattern, kind, template in PATTERNS:
        for match in re.finditer(pattern, text):
            content = template.format(*(g.strip() for g in match.groups()))
            found.append({"type": kind, "content": content[0].upper() + content[1:]})
    return found


def parse(answer: str) -> list[dict] | None:
    """The model's JSON answer as memories, or None when it is not exactly the asked format."""
    data = json_answer(answer)
    items = data.get("memories") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return None
    out = []
    for item in items:
        if not (isinstance(item, dict) and item.get("type") in KINDS and isinstance(item.get("content"), str)
                and 0 < len(item["content"].strip()) <= 500):
            return None
        out.append({"type": item["type"], "content": item["content"].strip()})
    return out


def normal(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def extract(text: str, config: Config, db) -> tuple[list[dict], str]:
    """(memories, how): by a remote model when one answers in the format, else by rules."""
    remote = [p for p in providers_from_config(config) if p.remote]
    if remote:
        try:
            answer = ProviderChain(remote, db, attempts=config.assistant_retry_attempts).chat(
                [{"role": "system", "content": PROMPT}, {"role": "user", "content": text}], 300)
            found = parse(answer.text)
            if found is not None:
                return found, answer.provider
        except AllProvidersFailed:
            pass
    return by_rules(text), "rules"


def store(memories: list[dict], session_id: str, user_id: str | None, db) -> list[dict]:
    """Store the ones not already there (same words, same user or session); returns those."""
    kept = Memories(db)
    known = {normal(m["content"]) for m in kept.list(None if user_id else session_id, user_id, limit=1000)}
    stored = []
    for memory in memories:
        key = normal(memory["content"])
        if key and key not in known:
            known.add(key)
            if (added := kept.add(memory["type"], memory["content"], session_id, user_id)) is not None:
                stored.append(added)  # None: the session was deleted meanwhile
    return stored


@task("assistant.extract", queue=ASSISTANT_QUEUE, max_attempts=3, timeout=300)
def extract_task(payload: dict) -> dict:
    config = load_config()
    db = get_database(config)
    rows = db.execute("SELECT m.content, m.session_id, s.user_id FROM assistant_messages m JOIN assistant_sessions s "
                      "ON s.id = m.session_id WHERE m.id = ?", (payload["message_id"],))
    if not rows:
        return {"skipped": "the message or its session was deleted"}
    found, how = extract(rows[0]["content"], config, db)
    stored = store(found, rows[0]["session_id"], rows[0]["user_id"], db)
    return {"found": len(found), "stored": len(stored), "by": how}
