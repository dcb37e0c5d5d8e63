"""The assistant's tools, and the tasks that run them.

When the model asks for tools, the reply task stores its request as a step of the reply and
submits a workflow: one ``assistant.tool`` task per call (in parallel), then
``assistant.continue``, which calls the model again with the results. Every step is a task, so
a worker killed mid-reply leaves the reply where it was, and the retry goes on from there.

A tool that fails gives the model the error as its result (the model may try something else);
it never fails the reply. Which tools the model sees: ``assistant.tools`` in the config (none by
default); ``enqueue`` runs only the task names in ``assistant.enqueue_allowed``; ``github``
is offered only when ``GITHUB_PAT`` is set.
"""
from __future__ import annotations

import json
import time

from helpers import reports
from helpers.config import Config, load_config
from helpers.engine import get_database
from helpers.queue_manager import QueueManager
from helpers.registry import TaskTimeout, handler_for
from helpers.tasks import task
from helpers.validation import ASSISTANT_QUEUE as QUEUE
from helpers.validation import STATED_MEMORY_TYPES
from lib import github
from lib.memory import Memories

RESULT_MAX_CHARS = 4000  # of a tool's result, as the model sees it

SPECS = {
    "web_search": {"description": "Search the web. Returns titles, links and snippets.",
                   "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                  "required": ["query"]}},
    "remember": {"description": "Store a fact or preference about the user for later conversations.",
                 "parameters": {"type": "object", "properties": {
                     "content": {"type": "string"},
                     "type": {"type": "string", "enum": list(STATED_MEMORY_TYPES)}},
                     "required": ["content"]}},
    "recall": {"description": "Search what was remembered about the user.",
               "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
    "fetch_page": {"description": "Open a web page in a browser (scripts run) and read its title, text and links.",
                   "parameters": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]}},
    "queue_status": {"description": "The OOS task queues: how many tasks wait, run, failed.",
                     "parameters": {"type": "object", "properties": {}}},
    "github": {"description": "Read GitHub (read-only): a repository (action repo), its issues (issues, with "
                              "state open/closed/all), one issue with its comments (issue, with number), or an "
                              "issue search (search_issues, with query and optionally repo).",
               "parameters": {"type": "object", "properties": {
                   "action": {"type": "string", "enum": ["repo", "issues", "issue", "search_issues"]},
                   "repo": {"type": "string", "description": "owner/name"}, "number": {"type": "integer"},
                   "state": {"type": "string", "enum": ["open", "closed", "all"]}, "query": {"type": "string"}},
                   "required": ["action"]}},
    "enqueue": {"description": "Run one of the user's background tasks by name, with a JSON payload.",
                "parameters": {"type": "object", "properties": {"task": {"type": "string"}, "payload": {}},
                               "required": ["task"]}},
}


class ToolError(Exception):
    """What the model is told went wrong with its call."""


def specs(config: Config, env=None) -> list[dict]:
    """The tools the config allows, as providers take them (``github`` only with GITHUB_PAT)."""
    return [dict(SPECS[name], name=name) for name in config.assistant_tools
            if name in SPECS and (name != "github" or github.configured(env))]


def run(name: str, arguments: dict, session: dict, config: Config, db) -> str:
    """Run one tool call; its result as text. ToolError for a call the model got wrong."""
    if name not in config.assistant_tools or name not in SPECS:
        raise ToolError(f"no tool {name!r}; the tools are: {', '.join(config.assistant_tools) or 'none'}")
    if "_invalid" in arguments:
        raise ToolError(f"the arguments must be a JSON object, got {arguments['_invalid']!r}")
    for field in SPECS[name]["parameters"].get("required", []):
        if not isinstance(arguments.get(field), str) or not arguments[field].strip():
            raise ToolError(f"{field}: required, a non-empty string")
    if name == "web_search":
        from lib.google_search_fallback import GoogleSearchFallback

        with GoogleSearchFallback(config, db=db) as search:
            found = search.search(arguments["query"], num_results=5)
        if not found.success:
            if found.error.startswith("not configured"):
                return "web search is not configured"
            raise ToolError(f"web search failed: {found.error}")
        return json.dumps(found.results) if found.results else "no results"
    if name == "fetch_page":
        from lib.browser import BrowserRefused, PageNotLoaded, fetch

        try:
            page = fetch(arguments["url"], config)
        except (BrowserRefused, PageNotLoaded) as e:  # one line the model can read
            raise ToolError(str(e)) from None
        return json.dumps({k: page[k] for k in ("url", "title", "text", "links")})
    memories = Memories(db)
    if name == "remember":
        kind = arguments.get("type") or "fact"
        if kind not in STATED_MEMORY_TYPES:
            raise ToolError(f"type: expected {', '.join(STATED_MEMORY_TYPES[:-1])} or {STATED_MEMORY_TYPES[-1]}, "
                            f"got {kind!r}")
        stored = memories.add(kind, arguments["content"], session["id"], session["user_id"])
        if stored is None:
            raise ToolError(f"session {session['id']} was deleted")
        return f"remembered (memory {stored['id']})"
    if name == "recall":
        found = memories.search(arguments["query"], session["id"], session["user_id"], 5)
        return json.dumps([{"type": m["type"], "content": m["content"]} for m in found]) if found else "nothing found"
    if name == "github":
        try:
            return json.dumps(github.read(arguments["action"], arguments, config, db))
        except github.Refused as e:
            raise ToolError(str(e)) from None
    if name == "queue_status":
        return json.dumps({q["queue"]: q["counts"] for q in reports.all_queues(db, config)})
    # enqueue
    if arguments["task"] not in config.assistant_enqueue_allowed:
        raise ToolError(f"task {arguments['task']!r} is not one the assistant may run "
                        f"(assistant.enqueue_allowed: {', '.join(config.assistant_enqueue_allowed) or 'none'})")
    spec = handler_for(arguments["task"])
    queue = QueueManager(spec.queue if spec else "default", db, config)
    return f"enqueued task {int(queue.enqueue(arguments['task'], arguments.get('payload')))}"


@task("assistant.tool", queue=QUEUE, max_attempts=3, timeout=120)
def tool(payload: dict) -> dict:
    """One tool call of a reply's step: runs it and stores its result as a ``tool`` message
    (once: a retry after a crash finds it stored)."""
    config = load_config()
    db = get_database(config)
    message_id, call = payload["message_id"], payload["call"]
    rows = db.execute("SELECT s.id, s.user_id FROM assistant_messages m JOIN assistant_sessions s "
                      "ON s.id = m.session_id WHERE m.id = ?", (message_id,))
    if not rows:
        return {"message_id": message_id, "skipped": "the session was deleted"}
    try:
        result = run(call["name"], call["arguments"], dict(rows[0]), config, db)
    except ToolError as e:
        result = f"error: {e}"
    except TaskTimeout:  # the model is told, as of any tool error, and the reply goes on
        result = "error: the tool ran past its time limit"
    except Exception as e:  # noqa: BLE001 - the model is told, the reply goes on
        result = f"error: {type(e).__name__}: {e}"
    db.execute("INSERT INTO assistant_messages (session_id, role, content, step_of, tool_call_id, provider, created_at) "
               "VALUES (?, 'tool', ?, ?, ?, ?, ?) ON CONFLICT (step_of, tool_call_id) DO NOTHING",
               (rows[0]["id"], result[:RESULT_MAX_CHARS], message_id, call["id"], call["name"], time.time()))
    return {"message_id": message_id}
