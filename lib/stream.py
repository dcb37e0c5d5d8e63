"""A reply's stream: the events the tasks making a reply write, and what a client reads.

The model's text is written piece by piece as it arrives (``token``), so a client following
``GET .../messages/<id>/stream`` sees it while the model writes. The tasks of one reply run
one after another (reply, then tools, then continue), so a message's events are written by one
writer at a time and their ids grow in commit order: a client that reconnects with the last
id it saw (``Last-Event-ID``) gets exactly the events after it, none twice, none missing.

The events, in order, with their JSON data:
- ``token`` ``{"text"}``: a piece of the model's text;
- ``tool_call`` ``{"id", "name", "arguments"}``: the model asked for a tool (its text so far
  was said on the way to asking);
- ``tool_result`` ``{"tool_call_id", "name", "content"}``: what the tool answered;
- ``restart`` ``{}``: the model's text since the last tool event came from a try that failed
  (a broken connection, a crashed worker); drop it, a new try follows;
- ``done`` ``{"reply_id", "provider", "content"}``: the reply is stored; the stream ends.
A reply that failed for good ends the stream with ``failed`` ``{"error"}`` (not ``error``,
which EventSource uses for a lost connection), whose id is one past the stored events: a client
reconnecting with it is answered 204, as after ``done``.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator

from helpers.queue_manager import in_batches

# A comment line this often: proxies and clients see the connection alive, and the server
# finds out soon that a client went away (a write fails), which frees its stream permit.
KEEPALIVE_SECONDS = 1.0


class ReplyStream:
    """The writer of one reply's events. Call ``attempt()`` before each model call and
    ``text(piece)`` for each piece of its text; the rest goes in with the writes it belongs to
    (``write(kind, data, conn)``)."""

    def __init__(self, db, message_id: int, clock=time.time):
        self.db, self.message_id, self.clock = db, message_id, clock
        last = db.execute("SELECT kind FROM reply_events WHERE message_id = ? ORDER BY id DESC LIMIT 1",
                          (message_id,))
        self.dirty = bool(last) and last[0][0] == "token"  # text of a try that did not finish

    def attempt(self) -> None:
        """A model call begins: text already streamed by a failed try is withdrawn."""
        if self.dirty:
            self.write("restart", {})

    def text(self, piece: str) -> None:
        if piece:
            # Not fsynced: a lost piece costs only a restart (the done event's commit is synced).
            self.write("token", {"text": piece}, synced=False)
            self.dirty = True

    def write(self, kind: str, data: dict, conn=None, synced: bool = True) -> None:
        sql = "INSERT INTO reply_events (message_id, kind, data, created_at) VALUES (?, ?, ?, ?)"
        args = (self.message_id, kind, json.dumps(data), self.clock())
        if conn is not None:
            conn.execute(sql, args)
        else:
            self.db.execute(sql, args, synced=synced)
        if kind != "token":
            self.dirty = False

    def tool_results(self, steps: list[dict]) -> None:
        """``tool_result`` events for the stored tool messages not told yet."""
        told = {json.loads(r[0])["tool_call_id"] for r in self.db.execute(
            "SELECT data FROM reply_events WHERE message_id = ? AND kind = 'tool_result'", (self.message_id,))}
        for step in steps:
            if step["role"] == "tool" and step["tool_call_id"] not in told:
                self.write("tool_result", {"tool_call_id": step["tool_call_id"], "name": step["provider"],
                                           "content": step["content"]})


def events_after(db, message_id: int, after: int, limit: int = 500) -> list[tuple[int, str, str]]:
    """(id, kind, data as JSON text) of the message's events after id ``after``, in order."""
    return [tuple(r) for r in db.execute("SELECT id, kind, data FROM reply_events WHERE message_id = ? AND id > ? "
                                         "ORDER BY id LIMIT ?", (message_id, after, limit))]


def ended_before(db, message_id: int, after: int) -> bool:
    """True when the message's ``done`` is at or before event ``after``: nothing more to send."""
    return bool(db.execute("SELECT 1 FROM reply_events WHERE message_id = ? AND kind = 'done' AND id <= ?",
                           (message_id, after)))


def final_id(db, message_id: int) -> int:
    """The id a reply's last event is sent with when it is not a stored event (a failure):
    one past its stored events, so a client that saw it, reconnecting, is told there is no
    more (204)."""
    return db.execute("SELECT coalesce(max(id), 0) + 1 FROM reply_events WHERE message_id = ?", (message_id,))[0][0]


def text_so_far(db, message_id: int) -> str:
    """The text of the model call under way, as a client shows it: the pieces since the last
    other event (a restart withdraws the text before it; a tool event or the plan ends a call)."""
    rows = db.execute("SELECT data FROM reply_events WHERE message_id = ? AND kind = 'token' AND id > "
                      "(SELECT coalesce(max(id), 0) FROM reply_events WHERE message_id = ? AND kind <> 'token') "
                      "ORDER BY id", (message_id, message_id))
    return "".join(json.loads(r[0])["text"] for r in rows)


def sse(db, message_id: int, after: int, ended, max_seconds: float, poll: float = 0.005,
        clock=time.monotonic, sleep=time.sleep) -> Iterator[str]:
    """The message's events after ``after`` as server-sent events, as they are written, until
    ``done``; or until ``ended()`` (asked when nothing new came) returns the last event, as
    (kind, data), of a reply that will write no more (failed, or made before replies had
    events), sent with the id ``final_id`` gives (a client reconnecting with it is told 204);
    or for ``max_seconds`` (then the client reconnects with Last-Event-ID). The reconnect
    delay (``retry:``) goes with the first event, not alone (some clients read a block holding
    only it as an empty event)."""
    retry = "retry: 1000\n"
    started = last_sent = last_check = clock()
    while clock() - started < max_seconds:
        rows = events_after(db, message_id, after)
        for event_id, kind, data in rows:
            yield f"{retry}id: {event_id}\nevent: {kind}\ndata: {data}\n\n"
            retry, after = "", event_id
            if kind == "done":
                return
        now = clock()
        if rows:
            last_sent = now
            continue
        if now - last_check >= 0.5:
            last_check = now
            last = ended()
            if last is not None:
                yield f"{retry}id: {final_id(db, message_id)}\nevent: {last[0]}\ndata: {json.dumps(last[1])}\n\n"
                return
        if now - last_sent >= KEEPALIVE_SECONDS:
            yield f"{retry}: keepalive\n\n"
            retry, last_sent = "", now
        sleep(poll)


# Replies' events past assistant.stream_keep_seconds (the replies stay in their messages).
PRUNE = ("""DELETE FROM reply_events WHERE id IN (SELECT id FROM reply_events WHERE created_at < :before
            LIMIT :batch)""",)


def prune(db, config, now: float, batch: int = 5000) -> int:
    """Delete the stream events older than ``assistant.stream_keep_seconds``; how many. The
    daemon runs it hourly beside the queue's own prune."""
    return in_batches(db, PRUNE, dict(before=now - config.assistant_stream_keep_seconds, batch=batch), batch)
