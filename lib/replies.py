"""The tasks that drive a reply: they sit above the assistant, its plans and its tools, which
therefore never import each other to find them.

- ``assistant.reply``: the reply to a user message (one model call, tools, or a plan);
- ``assistant.continue``: after a step's tools, the model again;
- ``assistant.agent`` / ``assistant.join``: one agent of a plan, and the answer from all of them.
"""
from __future__ import annotations

from helpers.tasks import task
from helpers.validation import ASSISTANT_QUEUE as QUEUE
from lib import plans
from lib.assistant import REPLY_TASK, Assistant


@task(REPLY_TASK, queue=QUEUE, max_attempts=4, timeout=600)
def reply(payload):
    return Assistant().reply(int(payload["message_id"]), bool(payload.get("use_search")), bool(payload.get("plan")))


@task("assistant.agent", queue=QUEUE, max_attempts=4, timeout=600)
def agent(payload: dict) -> dict:
    """One step of a plan: its agent's reply (stored once; a retry finds it)."""
    return Assistant().reply(int(payload["message_id"]), agent=True)


@task("assistant.join", queue=QUEUE, max_attempts=4, timeout=600)
def join_task(payload: dict) -> dict:
    return plans.join(Assistant(), int(payload["message_id"]))


@task("assistant.continue", queue=QUEUE, max_attempts=4, timeout=600)
def resume(payload) -> dict:
    """After a step's tools: call the model again. ``payload``: ``message_id`` and
    ``use_search`` of the reply (steps submitted before these were given theirs get the tool
    tasks' results instead: one result, or a list)."""
    first = payload[0] if isinstance(payload, list) else payload
    return Assistant().reply(int(first["message_id"]), bool(first.get("use_search")))
