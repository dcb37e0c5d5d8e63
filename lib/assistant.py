"""The assistant: sessions and messages in SQLite, replies made by the ``assistant.reply`` task.

Posting a message stores it and enqueues its reply task in one transaction, so a message is
never without the task that answers it, and a slow or failing model never blocks the API.
A reply is stored at most once per message (``reply_to`` is unique), however often the task
runs. When every provider fails, the task retries with backoff and finally dead-letters; the
message then shows ``reply_status: failed`` with the reason.

With tools configured (``assistant.tools``), a reply may take steps first: the model asks for
tools, the request is stored as a step, the tools run as tasks and the model is called again
with their results (lib/tools.py), up to ``assistant.max_steps`` steps and
``assistant.max_seconds``; then it must answer in words. A message posted with ``plan`` is
answered by several agents instead (lib/plans.py). Whatever the way, the reply's text and
steps are written as events as they happen, for clients that stream it (lib/stream.py).
"""
from __future__ import annotations

import json
import time
import uuid

from helpers import workflow
from helpers.config import Config, load_config
from helpers.engine import get_database
from helpers.queue_manager import QueueManager
from helpers.registry import PermanentError
from helpers.validation import ASSISTANT_QUEUE as QUEUE
from helpers.validation import InvalidField, existing_id, json_text
from lib import context, plans, tools
from lib.llm_providers import Local, ProviderChain, Reply, providers_from_config
from lib.memory import Memories
from lib.stream import ReplyStream

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
                        (session_id, user_id, system_prompt or "", provider, json_text("metadata", metadata or {}),
                         self.clock()))
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
            # The agents of its plans go with it: their prompts and replies hold the user's words.
            agents = [r[0] for r in conn.execute(
                "SELECT s.session_id FROM assistant_plan_steps s JOIN assistant_messages m ON m.id = s.message_id "
                "WHERE m.session_id = ?", (session_id,)).fetchall()]
            for gone in [session_id, *agents]:
                if not conn.execute("DELETE FROM assistant_sessions WHERE id = ?", (gone,)).rowcount and gone == session_id:
                    raise NotFound(f"no session {session_id}")
                conn.execute("DELETE FROM memories WHERE session_id = ?", (gone,))

    # -- messages -------------------------------------------------------------------------

    def post_message(self, session_id: str, content: str, use_search: bool = False, plan: bool = False) -> dict:
        """Store the user's message and enqueue its reply, atomically. Returns message and task
        ids. ``plan``: agents answer it (lib/plans.py)."""
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
                                                "payload": {"message_id": message_id, "use_search": bool(use_search),
                                                            "plan": bool(plan)},
                                                "max_attempts": 4, "timeout": 600}], conn=conn)[0].id
            conn.execute("UPDATE assistant_messages SET task_id = ? WHERE id = ?", (task_id, message_id))
        self.db.hint(self.queue.name)
        return {"message_id": message_id, "task_id": task_id}

    def messages(self, session_id: str, after: int = 0, limit: int = 100) -> list[dict]:
        """Messages after ``after`` in order; a user message says whether its reply is pending,
        done or failed (with the reason), so a client that lost its connection can resume."""
        self.get_session(session_id)
        rows = self.db.execute(self.MESSAGES + "WHERE m.session_id = ? AND m.id > ? ORDER BY m.id LIMIT ?",
                               (session_id, after, limit))
        return [self._message_view(r) for r in rows]

    # The task now making a user message's reply, whose state is the reply's: the join when
    # agents answer it, else the last task of its latest tool step (assistant.continue, the
    # chord's callback, is the workflow's last), else its reply task.
    NOW_MAKING = """COALESCE(p.join_task, (SELECT max(w.id) FROM tasks w WHERE w.workflow =
        (SELECT max(s.workflow) FROM assistant_messages s WHERE s.step_of = m.id)), m.task_id)"""
    MESSAGES = f"""
        SELECT m.*, t.state AS task_state, t.last_error AS task_error, p.message_id AS planned,
               (SELECT r.id FROM assistant_messages r WHERE r.reply_to = m.id) AS reply_id
        FROM assistant_messages m LEFT JOIN assistant_plans p ON p.message_id = m.id
        LEFT JOIN tasks t ON t.id = {NOW_MAKING} """

    def message(self, session_id: str, message_id: int) -> dict:
        """One message of the session (NotFound otherwise)."""
        if not existing_id(message_id):
            raise NotFound(f"no message {message_id} in session {session_id}")
        rows = self.db.execute(self.MESSAGES + "WHERE m.session_id = ? AND m.id = ?", (session_id, message_id))
        if not rows:
            raise NotFound(f"no message {message_id} in session {session_id}")
        return self._message_view(rows[0])

    def reply_to(self, message_id: int) -> dict | None:
        rows = self.db.execute("SELECT *, NULL AS task_state, NULL AS task_error, NULL AS reply_id, NULL AS planned "
                               "FROM assistant_messages WHERE reply_to = ?", (message_id,))
        return self._message_view(rows[0]) if rows else None

    def wait_for_reply(self, message_id: int, seconds: float) -> dict | None:
        deadline = time.monotonic() + seconds
        while True:
            found = self.reply_to(message_id)
            if found or time.monotonic() >= deadline or self.failure(message_id):
                return found
            time.sleep(0.05)

    def failure(self, message_id: int) -> str | None:
        """Why the message will get no reply (its reply task, or its plan's join, failed for
        good), or None while it may still get one."""
        rows = self.db.execute(self.MESSAGES + "WHERE m.id = ?", (message_id,))
        if not rows:
            return None
        view = self._message_view(rows[0])
        return view["reply_error"] if view.get("reply_status") == "failed" else None

    def stream_end(self, message_id: int) -> tuple[str, dict] | None:
        """The last event of a reply that will write no more: ``failed`` when it failed (not
        ``error``, EventSource's own name for a lost connection), ``done`` when it was made
        before replies had events (or they were deleted); else None."""
        reason = self.failure(message_id)
        if reason is not None:
            return "failed", {"error": reason}
        reply = self.reply_to(message_id)
        if reply and not self.db.execute("SELECT 1 FROM reply_events WHERE message_id = ? AND kind = 'done'",
                                         (message_id,)):
            return "done", {"reply_id": reply["id"], "provider": reply["provider"], "content": reply["content"]}
        return None

    # -- making a reply (the task) ------------------------------------------------------

    def turn(self, message_id: int, remember: bool = True) -> tuple[dict, ProviderChain | None]:
        """The user message to answer (with its session's ``system_prompt``, ``preferred``
        provider and ``user_id``) and the providers to ask; or, when there is nothing to do
        (deleted, or answered already), what there is to say about it and None. ``remember``:
        an answered message's memories are drawn (in case the run that stored it died first)."""
        rows = self.db.execute("SELECT m.*, s.system_prompt, s.provider AS preferred, s.user_id FROM "
                               "assistant_messages m JOIN assistant_sessions s ON s.id = m.session_id "
                               "WHERE m.id = ? AND m.role = 'user'", (message_id,))
        if not rows:
            return {"skipped": "the message or its session was deleted"}, None
        done = self.reply_to(message_id)
        if done:
            if remember:
                self._extract_memories(message_id)
            return {"message_id": done["id"], "provider": done["provider"]}, None
        providers = providers_from_config(self.config)
        if not providers:
            raise PermanentError("no LLM provider is available: set a provider's key or install the local model")
        return dict(rows[0]), ProviderChain(providers, self.db, attempts=self.config.assistant_retry_attempts)

    def reply(self, message_id: int, use_search: bool = False, plan: bool = False, agent: bool = False) -> dict:
        """Make the reply to a user message (the ``assistant.reply`` task): one model call, or a
        step of tool calls (the tools run as tasks, then ``assistant.continue`` calls this
        again), or the plan (``plan``: lib/plans.py). Stored at most once, however often it runs.
        ``agent``: the message is a plan's step, answered in words (no tools), and what it says
        is the planner's, not the user's, so no memory is drawn from it."""
        message, chain = self.turn(message_id, remember=not agent)
        if chain is None:
            return message  # nothing to do
        if plan:
            return plans.start(self, message, chain)
        steps = [dict(r) for r in self.db.execute(
            "SELECT * FROM assistant_messages WHERE step_of = ? ORDER BY id", (message_id,))]
        asked = [s for s in steps if s["role"] == "assistant"]
        if asked:  # the last step's tools: all answered, or some still running
            calls = json.loads(asked[-1]["tool_calls"])
            answered = {s["tool_call_id"] for s in steps if s["role"] == "tool" and s["id"] > asked[-1]["id"]}
            if not all(c["id"] in answered for c in calls):
                return {"message_id": message_id, "tools_running": len(calls)}
        providers = chain.providers
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
        in_budget = (not agent and len(asked) < self.config.assistant_max_steps
                     and self.clock() - message["created_at"] < self.config.assistant_max_seconds)
        stream = ReplyStream(self.db, message_id, self.clock)
        stream.tool_results(steps)
        answer = chain.chat(messages + [self._wire(s) for s in steps], self.config.assistant_max_reply_tokens,
                            prefer=message["preferred"], tools=tools.specs(self.config) if in_budget else None,
                            stream=stream)
        if answer.tool_calls:
            self._run_tools(message, answer, stream, use_search)
            return {"message_id": message_id, "step": len(asked) + 1, "tool_calls": len(answer.tool_calls)}
        return dict(self.store_reply(message, answer, stream, remember=not agent), search_results=len(results))

    def store_reply(self, message, answer: Reply, stream: ReplyStream, remember: bool = True) -> dict:
        """Store ``answer`` as the reply to ``message`` (once) with the stream's ``done``;
        ``remember``: then draw memories from the user's message."""
        with self.db.transaction() as conn:
            stored = conn.execute(
                "INSERT INTO assistant_messages (session_id, role, content, reply_to, provider, created_at) "
                "VALUES (?, 'assistant', ?, ?, ?, ?) ON CONFLICT (reply_to) DO NOTHING RETURNING id",
                (message["session_id"], answer.text, message["id"], answer.provider, self.clock())).fetchall()
            if stored:
                stream.write("done", {"reply_id": stored[0][0], "provider": answer.provider,
                                      "content": answer.text}, conn)
        reply = self.reply_to(message["id"])
        if remember:
            self._extract_memories(message["id"])
        return {"message_id": reply["id"], "provider": reply["provider"], "finish_reason": answer.finish_reason}

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

    def _run_tools(self, message, answer: Reply, stream: ReplyStream, use_search: bool = False) -> None:
        """Store the step, and submit its tools as tasks side by side, then the model again
        (lib/tools.py): in one transaction, so a step is never without the tasks that answer it.
        A page to fetch goes to the ``browser`` queue, whose limits bound the browsers running."""
        flow = workflow.chord(
            [workflow.step("assistant.tool", {"message_id": message["id"], "call": c},
                           queue="browser" if c["name"] == "fetch_page" else QUEUE) for c in answer.tool_calls],
            workflow.step("assistant.continue", {"message_id": message["id"], "use_search": use_search}, queue=QUEUE))
        with self.db.transaction() as conn:
            submitted = workflow.submit(self.db, flow, self.config, conn=conn)
            conn.execute("INSERT INTO assistant_messages (session_id, role, content, step_of, tool_calls, provider, "
                         "workflow, created_at) VALUES (?, 'assistant', ?, ?, ?, ?, ?, ?)",
                         (message["session_id"], answer.text, message["id"], json.dumps(answer.tool_calls),
                          answer.provider, submitted["workflow"], self.clock()))
            for call in answer.tool_calls:
                stream.write("tool_call", call, conn)
        self.db.hint(QUEUE)

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
            elif row["task_state"] in ("dead", "cancelled", "blocked"):  # blocked: a tool or an agent died
                status, error = "failed", row["task_error"] or f"the reply's task is {row['task_state']}"
            else:
                status, error = "pending", None
            view.update(task_id=row["task_id"], reply_status=status, reply_error=error, reply_id=row["reply_id"],
                        plan=row["planned"] is not None)
        return view
