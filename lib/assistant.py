"""The assistant: sessions and messages in SQLite, replies made by the ``assistant.reply`` task.

Posting a message stores it and enqueues its reply task in one transaction, so a message is
never without the task that answers it, and a slow or failing model never blocks the API.
A reply is stored at most once per message (``reply_to`` is unique), however often the task
runs. When every provider fails, the task retries with backoff and finally dead-letters; the
message then shows ``reply_status: failed`` with the reason.

With tools configured (``assistant.tools``), a reply may take steps first: the model asks for
tools, the request is stored as a step, the tools run as tasks and the model is called again
with their results (lib/tools.py), up to ``assistant.max_steps`` steps and
``assistant.max_seconds``; then it must answer in words.
"""
from __future__ import annotations

import json
import time
import uuid

from helpers import workflow
from helpers.config import Config, load_config
from helpers.database_config import get_database
from helpers.queue_manager import QueueManager
from helpers.tasks import PermanentError, task
from helpers.validation import InvalidField
from lib import context, tools
from lib.llm_providers import Local, ProviderChain, providers_from_config
from lib.memory import Memories

QUEUE = "assistant"
REPLY_TASK = "assistant.reply"


class NotFound(LookupError):
    """No such session or message (the API answers 404)."""


class Assistant:
    def __init__(self, config: Config | None = None, db=None, clock=time.time):
        self.config = config or load_config()
        self.db = db or get_database(self.config)
        self.clock = clock
        self.queue = QueueManager(QUEUE, self.db, self.config)
        self.memories = Memories(self.db, clock)

    # -- sessions -------------------------------------------------------------------------

    def create_session(self, system_prompt: str = "", provider: str | None = None, metadata: dict | None = None,
                       user_id: str | None = None) -> dict:
        session_id = uuid.uuid4().hex
        self.db.execute("INSERT INTO assistant_sessions (id, user_id, system_prompt, provider, metadata, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (session_id, user_id, system_prompt or "", provider, json.dumps(metadata or {}), self.clock()))
        return self.get_session(session_id)

    def get_session(self, session_id: str) -> dict:
        rows = self.db.execute("SELECT s.*, (SELECT count(*) FROM assistant_messages m WHERE m.session_id = s.id) "
                               "AS messages FROM assistant_sessions s WHERE id = ?", (session_id,))
        if not rows:
            raise NotFound(f"no session {session_id}")
        return self._session_view(rows[0])

    def list_sessions(self, limit: int = 50, offset: int = 0, user_id: str | None = None) -> list[dict]:
        rows = self.db.execute("SELECT s.*, (SELECT count(*) FROM assistant_messages m WHERE m.session_id = s.id) "
                               "AS messages FROM assistant_sessions s WHERE (? IS NULL OR user_id = ?) "
                               "ORDER BY created_at DESC LIMIT ? OFFSET ?", (user_id, user_id, limit, offset))
        return [self._session_view(r) for r in rows]

    def delete_session(self, session_id: str) -> None:
        with self.db.transaction() as conn:
            if not conn.execute("DELETE FROM assistant_sessions WHERE id = ?", (session_id,)).rowcount:
                raise NotFound(f"no session {session_id}")
            conn.execute("DELETE FROM memories WHERE session_id = ?", (session_id,))

    # -- messages -------------------------------------------------------------------------

    def post_message(self, session_id: str, content: str, use_search: bool = False) -> dict:
        """Store the user's message and enqueue its reply, atomically. Returns message and task ids."""
        if not isinstance(content, str) or not content.strip():
            raise InvalidField("content", "must not be empty")
        if len(content) > self.config.assistant_max_message_chars:
            raise InvalidField("content", f"{len(content)} characters is over the limit of "
                                          f"{self.config.assistant_max_message_chars}")
        self.get_session(session_id)
        with self.db.transaction() as conn:
            message_id = conn.execute("INSERT INTO assistant_messages (session_id, role, content, created_at) "
                                      "VALUES (?, 'user', ?, ?) RETURNING id",
                                      (session_id, content, self.clock())).fetchone()[0]
            task_id = self.queue.enqueue_many([{"task": REPLY_TASK, "idempotency_key": f"reply:{message_id}",
                                                "payload": {"message_id": message_id, "use_search": bool(use_search)},
                                                "max_attempts": 4, "timeout": 600}], conn=conn)[0].id
            conn.execute("UPDATE assistant_messages SET task_id = ? WHERE id = ?", (task_id, message_id))
        self.db.hint(self.queue.name)
        return {"message_id": message_id, "task_id": task_id}

    def messages(self, session_id: str, after: int = 0, limit: int = 100) -> list[dict]:
        """Messages after ``after`` in order; a user message says whether its reply is pending,
        done or failed (with the reason), so a client that lost its connection can resume."""
        self.get_session(session_id)
        rows = self.db.execute("""
            SELECT m.*, t.state AS task_state, t.last_error AS task_error,
                   (SELECT r.id FROM assistant_messages r WHERE r.reply_to = m.id) AS reply_id
            FROM assistant_messages m LEFT JOIN tasks t ON t.id = m.task_id
            WHERE m.session_id = ? AND m.id > ? ORDER BY m.id LIMIT ?""", (session_id, after, limit))
        return [self._message_view(r) for r in rows]

    def reply_to(self, message_id: int) -> dict | None:
        rows = self.db.execute("SELECT *, NULL AS task_state, NULL AS task_error, NULL AS reply_id "
                               "FROM assistant_messages WHERE reply_to = ?", (message_id,))
        return self._message_view(rows[0]) if rows else None

    def wait_for_reply(self, message_id: int, seconds: float) -> dict | None:
        deadline = time.monotonic() + seconds
        while True:
            found = self.reply_to(message_id)
            if found or time.monotonic() >= deadline:
                return found
            task = self.queue.get_task(self.db.execute("SELECT task_id FROM assistant_messages WHERE id = ?",
                                                       (message_id,))[0][0])
            if task is not None and task.state == "dead":
                return None
            time.sleep(0.05)

    # -- making a reply (the task) ------------------------------------------------------

    def reply(self, message_id: int, use_search: bool = False) -> dict:
        rows = self.db.execute("SELECT m.*, s.system_prompt, s.provider AS preferred, s.user_id FROM "
                               "assistant_messages m JOIN assistant_sessions s ON s.id = m.session_id "
                               "WHERE m.id = ? AND m.role = 'user'", (message_id,))
        if not rows:
            return {"skipped": "the message or its session was deleted"}
        message = rows[0]
        done = self.reply_to(message_id)
        if done:
            self._extract_memories(message_id)  # in case the run that stored the reply died before this
            return {"message_id": done["id"], "provider": done["provider"]}
        providers = providers_from_config(self.config)
        if not providers:
            raise PermanentError("no LLM provider is available: set a provider's key or install the local model")
        history = [dict(r) for r in self.db.execute(
            "SELECT id, role, content FROM assistant_messages WHERE session_id = ? AND id < ? AND summarized = 0 "
            "AND step_of IS NULL AND (role = 'assistant' OR id IN (SELECT reply_to FROM assistant_messages WHERE reply_to IS NOT NULL)) "
            "ORDER BY id", (message["session_id"], message_id))]
        memories = self._memories_for(message)
        results = self._search(message["content"]) if use_search else []
        count = providers[0].count_tokens if isinstance(providers[0], Local) else context.estimate_tokens
        # Retrieved context gets at most a third of the budget; the conversation keeps the rest.
        system = context.fit_system(message["system_prompt"], memories, results,
                                    self.config.assistant_context_tokens // 3, count)
        messages, dropped = context.build(system, history, message["content"], self.config.assistant_context_tokens,
                                          self.config.assistant_max_reply_tokens, count)
        if sum(count(m["content"]) for m in messages) > self.config.assistant_context_tokens:
            raise PermanentError(f"the message does not fit the model's context of "
                                 f"{self.config.assistant_context_tokens} tokens")
        if dropped:
            self._fold_into_memory(message["session_id"], dropped)
        steps = [dict(r) for r in self.db.execute(
            "SELECT * FROM assistant_messages WHERE step_of = ? ORDER BY id", (message_id,))]
        asked = [s for s in steps if s["role"] == "assistant"]
        if asked:  # the last step's tools: all answered, or still to run (or to submit, after a crash)
            calls = json.loads(asked[-1]["tool_calls"])
            answered = {s["tool_call_id"] for s in steps if s["role"] == "tool" and s["id"] > asked[-1]["id"]}
            if not all(c["id"] in answered for c in calls):
                if asked[-1]["workflow"] is None:
                    self._run_tools(message_id, asked[-1]["id"], calls)
                return {"message_id": message_id, "tools_running": len(calls)}
        in_budget = (len(asked) < self.config.assistant_max_steps
                     and self.clock() - message["created_at"] < self.config.assistant_max_seconds)
        chain = ProviderChain(providers, self.db, attempts=self.config.assistant_retry_attempts)
        answer = chain.chat(messages + [self._wire(s) for s in steps], self.config.assistant_max_reply_tokens,
                            prefer=message["preferred"], tools=tools.specs(self.config) if in_budget else None)
        if answer.tool_calls:
            step_id = self.db.execute(
                "INSERT INTO assistant_messages (session_id, role, content, step_of, tool_calls, provider, created_at) "
                "VALUES (?, 'assistant', ?, ?, ?, ?, ?) RETURNING id",
                (message["session_id"], answer.text, message_id, json.dumps(answer.tool_calls), answer.provider,
                 self.clock()))[0][0]
            self._run_tools(message_id, step_id, answer.tool_calls)
            return {"message_id": message_id, "step": len(asked) + 1, "tool_calls": len(answer.tool_calls)}
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO assistant_messages (session_id, role, content, reply_to, provider, created_at) "
                         "VALUES (?, 'assistant', ?, ?, ?, ?) ON CONFLICT (reply_to) DO NOTHING",
                         (message["session_id"], answer.text, message_id, answer.provider, self.clock()))
        stored = self.reply_to(message_id)
        self._extract_memories(message_id)
        return {"message_id": stored["id"], "provider": stored["provider"], "finish_reason": answer.finish_reason,
                "search_results": len(results)}

    def _memories_for(self, message) -> list[dict]:
        """The memories that match the message, then the user's standing preferences and
        instructions (they apply whatever is asked), up to ``memories_in_context``."""
        limit = self.config.assistant_memories_in_context
        found = self.memories.search(message["content"], message["session_id"], message["user_id"], limit)
        scope = (None, message["user_id"]) if message["user_id"] else (message["session_id"], None)
        standing = [m for kind in ("instruction", "preference")
                    for m in self.memories.list(*scope, memory_type=kind, limit=limit)]
        seen = {m["id"] for m in found}
        return (found + [m for m in standing if m["id"] not in seen])[:limit]

    def _extract_memories(self, message_id: int) -> None:
        """What the user said about themselves, into memories, by a task of its own (once)."""
        if self.config.assistant_extract_memories:
            self.queue.enqueue("assistant.extract", {"message_id": message_id}, idempotency_key=f"extract:{message_id}")

    def _run_tools(self, message_id: int, step_id: int, calls: list[dict]) -> None:
        """The step's tools as tasks, side by side, then the model again (lib/tools.py)."""
        flow = workflow.chord([workflow.step("assistant.tool", {"message_id": message_id, "call": c}, queue=QUEUE)
                               for c in calls], workflow.step("assistant.continue", queue=QUEUE))
        submitted = workflow.submit(self.db, flow, self.config)
        self.db.execute("UPDATE assistant_messages SET workflow = ? WHERE id = ?", (submitted["workflow"], step_id))

    @staticmethod
    def _wire(step: dict) -> dict:
        """A stored step as the providers take it (OpenAI's shape)."""
        if step["role"] == "tool":
            return {"role": "tool", "tool_call_id": step["tool_call_id"], "content": step["content"]}
        return {"role": "assistant", "content": step["content"] or "",
                "tool_calls": [{"id": c["id"], "type": "function",
                                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                               for c in json.loads(step["tool_calls"])]}

    def _search(self, query: str) -> list[dict]:
        from lib.google_search_fallback import GoogleSearchFallback

        with GoogleSearchFallback(self.config, db=self.db) as client:
            response = client.search(query, num_results=3)
        return response.results if response.success else []

    def _fold_into_memory(self, session_id: str, turns: list[dict]) -> None:
        """History that no longer fits becomes an episode memory instead of vanishing."""
        self.memories.add("episode", context.summarize(turns), session_id=session_id)
        ids = [t["id"] for t in turns]
        with self.db.transaction() as conn:
            conn.executemany("UPDATE assistant_messages SET summarized = 1 WHERE id = ?", [(i,) for i in ids])

    # -- views ----------------------------------------------------------------------------

    @staticmethod
    def _session_view(row) -> dict:
        return {"id": row["id"], "user_id": row["user_id"], "system_prompt": row["system_prompt"],
                "provider": row["provider"], "metadata": json.loads(row["metadata"]),
                "created_at": row["created_at"], "messages": row["messages"]}

    @staticmethod
    def _message_view(row) -> dict:
        view = {"id": row["id"], "session_id": row["session_id"], "role": row["role"], "content": row["content"],
                "created_at": row["created_at"], "reply_to": row["reply_to"], "provider": row["provider"],
                "step_of": row["step_of"], "tool_call_id": row["tool_call_id"],
                "tool_calls": json.loads(row["tool_calls"]) if row["tool_calls"] else None}
        if row["role"] == "user":
            if row["reply_id"]:
                status, error = "complete", None
            elif row["task_state"] in ("dead", "cancelled"):
                status, error = "failed", row["task_error"]
            else:
                status, error = "pending", None
            view.update(task_id=row["task_id"], reply_status=status, reply_error=error, reply_id=row["reply_id"])
        return view


@task(REPLY_TASK, queue=QUEUE, max_attempts=4, timeout=600)
def reply(payload):
    return Assistant().reply(int(payload["message_id"]), bool(payload.get("use_search")))
