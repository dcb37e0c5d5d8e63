"""``/api/v1/assistant``: sessions, messages, memories, providers. Every route needs the token."""
from __future__ import annotations

from apiflask import APIBlueprint, abort
from flask import Response, request
from werkzeug.routing import BaseConverter

from api import current
from api.auth import auth
from api.errors import or_404
from api.schemas import (
    MemoriesOut,
    MemoryIn,
    MemoryListIn,
    MemoryOut,
    MemoryPatchIn,
    MemorySearchIn,
    MessageIn,
    MessagesIn,
    MessagesOut,
    PlanOut,
    PostedOut,
    ProvidersOut,
    SessionIn,
    SessionListIn,
    SessionOut,
    SessionsOut,
    StreamIn,
    WaitIn,
)
from helpers.validation import InvalidField, existing_id
from lib import plans, stream
from lib.assistant import Assistant, NotFound
from lib.llm_providers import provider_status, providers_from_config

bp = APIBlueprint("assistant", __name__, url_prefix="/api/v1/assistant", tag="Assistant")


class SessionId(BaseConverter):
    """``<session_id:...>``: a session's id as ``create_session`` makes it (32 hex digits). Any
    other path segment is no session: the router's 404, before the database sees it."""
    regex = "[0-9a-f]{32}"


def assistant() -> Assistant:
    return Assistant(current.config(), current.db())


def found(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except NotFound as e:
        abort(404, str(e))


@bp.post("/sessions")
@bp.auth_required(auth)
@bp.input(SessionIn, arg_name="body")
@bp.output(SessionOut, status_code=201)
def create_session(body):
    """Start a conversation (optional system prompt, preferred provider, metadata, user id)."""
    return assistant().create_session(body["system_prompt"], body.get("provider"), body["metadata"], body.get("user_id"))


@bp.get("/sessions")
@bp.auth_required(auth)
@bp.input(SessionListIn, location="query", arg_name="page")
@bp.output(SessionsOut)
def list_sessions(page):
    return {"items": assistant().list_sessions(page["limit"], page["offset"], page.get("user_id"))}


@bp.get("/sessions/<session_id:session_id>")
@bp.auth_required(auth)
@bp.output(SessionOut)
def get_session(session_id):
    return found(assistant().get_session, session_id)


@bp.delete("/sessions/<session_id:session_id>")
@bp.auth_required(auth)
@bp.output({}, status_code=204)
def delete_session(session_id):
    """The session, with its messages, the memories stored in it and its agents' sessions."""
    found(assistant().delete_session, session_id)
    return ""


@bp.post("/sessions/<session_id:session_id>/messages")
@bp.auth_required(auth)
@bp.input(MessageIn, arg_name="body")
@bp.input(WaitIn, location="query", arg_name="options")
@bp.output(PostedOut, status_code=202, description="stored; the reply is being made (200 with ?wait= "
                                                   "once the reply is ready)")
def post_message(session_id, body, options):
    """Store the message (durably), enqueue its reply; with ``?wait=SECONDS`` return the reply."""
    a = assistant()
    posted = found(a.post_message, session_id, body["content"], body["use_search"], body["plan"])
    if options["wait"] > 0:
        reply = a.wait_for_reply(posted["message_id"], options["wait"])
        if reply is not None:
            return {**posted, "reply": reply}, 200
    return {**posted, "reply": None}


@bp.get("/sessions/<session_id:session_id>/messages")
@bp.auth_required(auth)
@bp.input(MessagesIn, location="query", arg_name="page")
@bp.output(MessagesOut)
def list_messages(session_id, page):
    """Messages after ``after`` (a message id), oldest first."""
    return {"items": found(assistant().messages, session_id, page["after"], page["limit"])}


@bp.get("/sessions/<session_id:session_id>/messages/<int:message_id>/stream")
@bp.auth_required(auth)
@bp.input(StreamIn, location="query", arg_name="query")
@bp.doc(responses={200: "text/event-stream: the reply's events as they are written (lib/stream.py), "
                        "ending with done (or failed, with an id: reconnecting with it answers 204)",
                        204: "the client has seen the reply's last event", 429: "too many streams open"})
def stream_reply(session_id, message_id, query):
    """The reply to a message as server-sent events: its text as the model writes it, its tool
    calls and results, then ``done``. Reconnecting with ``Last-Event-ID`` (or ``?after=``)
    resumes after that event: nothing missed, nothing twice; after ``done``, 204 (an
    EventSource stops reconnecting). ``message_id``: the user's message, or its reply or a
    step of it."""
    a = assistant()
    message = found(a.message, session_id, message_id)
    message_id = message["reply_to"] or message["step_of"] or message_id
    after = query.get("after", 0)
    header = request.headers.get("Last-Event-ID")
    if header is not None and header.strip():  # an empty one is no id (as a fresh EventSource sends none)
        if not (header.isascii() and header.strip().isdigit() and len(header.strip()) <= 18):
            raise InvalidField("Last-Event-ID", f"expected an event id (a whole number), got {header[:40]!r}")
        after = int(header)
    if stream.ended_before(a.db, message_id, after) or (
            after >= stream.final_id(a.db, message_id) and a.stream_end(message_id) is not None):
        return "", 204  # the client saw the last event: 204 tells an EventSource to stop reconnecting
    if not current.streams().acquire(blocking=False):
        abort(429, f"{current.config().assistant_max_streams} streams are open already (assistant.max_streams); "
                   f"try again soon")
    events = stream.sse(a.db, message_id, after, lambda: a.stream_end(message_id),
                        current.config().assistant_stream_seconds)
    return Response(_Permitted(events, current.streams()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Permitted:
    """``events`` holding a stream permit, given back once when the stream ends or fails, or
    when the server closes it (the client went away, or it never started)."""

    def __init__(self, events, permit):
        self.events, self.permit, self.held = events, permit, True

    def __iter__(self):
        try:
            yield from self.events
        finally:
            self.close()

    def close(self):
        if self.held:
            self.held = False
            self.permit.release()
        self.events.close()


@bp.get("/sessions/<session_id:session_id>/messages/<int:message_id>/plan")
@bp.auth_required(auth)
@bp.output(PlanOut)
def plan(session_id, message_id):
    """The agents answering a message posted with ``plan``: each step's role, instruction,
    state and reply so far, and the plan's state."""
    a = assistant()
    found(a.message, session_id, message_id)
    return or_404(plans.view(a.db, message_id), f"plan for message {message_id}")


@bp.post("/memories")
@bp.auth_required(auth)
@bp.input(MemoryIn, arg_name="body")
@bp.output(MemoryOut, status_code=201)
def add_memory(body):
    memory = assistant().memories.add(body["type"], body["content"], body.get("session_id"), body.get("user_id"),
                                      body.get("ttl_seconds"))
    return or_404(memory, f"session {body.get('session_id')}")


@bp.get("/memories")
@bp.auth_required(auth)
@bp.input(MemoryListIn, location="query", arg_name="filters")
@bp.output(MemoriesOut)
def list_memories(filters):
    return {"items": assistant().memories.list(filters.get("session_id"), filters.get("user_id"),
                                               filters.get("type"), filters["limit"], filters["offset"])}


@bp.get("/memories/search")
@bp.auth_required(auth)
@bp.input(MemorySearchIn, location="query", arg_name="query")
@bp.output(MemoriesOut)
def search_memories(query):
    """Best matches for ``q`` (bm25 keyword ranking, plus embeddings when installed)."""
    return {"items": assistant().memories.search(query["q"], query.get("session_id"), query.get("user_id"),
                                                 query["limit"])}


@bp.get("/memories/<int:memory_id>")
@bp.auth_required(auth)
@bp.output(MemoryOut)
def get_memory(memory_id):
    return or_404(assistant().memories.get(memory_id) if existing_id(memory_id) else None, f"memory {memory_id}")


@bp.patch("/memories/<int:memory_id>")
@bp.auth_required(auth)
@bp.input(MemoryPatchIn, arg_name="body")
@bp.output(MemoryOut)
def update_memory(memory_id, body):
    memory = assistant().memories.update(memory_id, body.get("content"), body.get("type"),
                                         body.get("ttl_seconds")) if existing_id(memory_id) else None
    return or_404(memory, f"memory {memory_id}")


@bp.delete("/memories/<int:memory_id>")
@bp.auth_required(auth)
@bp.output({}, status_code=204)
def delete_memory(memory_id):
    if not existing_id(memory_id) or not assistant().memories.delete(memory_id):
        abort(404, f"no memory {memory_id}")
    return ""


@bp.get("/providers")
@bp.auth_required(auth)
@bp.output(ProvidersOut)
def providers():
    """Each configured provider's breaker, calls, errors and recent latency. No keys."""
    return {"items": provider_status(current.db(), providers_from_config(current.config()))}
