"""A real HTTP server on 127.0.0.1 that speaks the wire formats of the remotes OOS calls:
OpenAI chat completions (JSON and SSE streaming), Anthropic messages (JSON and SSE), and the
Google Custom Search JSON API. Tests script what it does next: ``server.script("openai", ...)``
with actions ``("ok", text)``, ``("status", code, headers)``, ``("slow", seconds)``, ``("cut",)``
(a stream that stops before its finish reason), ``("tool", name, arguments)`` (the model calls a
tool, in that remote's format, streamed or not), ``("hold", event)`` (answer once the test sets
``event``), ``("gated", text, event)`` (stream half of ``text``, the rest once ``event`` is set).
A text may be a function of the request's body. Every request is recorded."""
from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

ISSUE = {"number": 7, "title": "Crash on start", "state": "open", "user": {"login": "ann"}, "comments": 1,
         "labels": [{"name": "bug"}], "html_url": "https://github.com/acme/widgets/issues/7",
         "body": "It crashes when the config is empty."}
GITHUB = {  # GitHub's REST API, the parts the github tool reads, for one repository
    "/repos/acme/widgets": {"full_name": "acme/widgets", "description": "Widgets", "language": "Python",
                            "default_branch": "main", "stargazers_count": 42, "forks_count": 3,
                            "open_issues_count": 1, "html_url": "https://github.com/acme/widgets"},
    "/repos/acme/widgets/issues": [ISSUE],
    "/repos/acme/widgets/issues/7": ISSUE,
    "/repos/acme/widgets/issues/7/comments": [{"user": {"login": "bob"}, "body": "Same here."}],
    "/search/issues": {"total_count": 1, "items": [ISSUE]},
}


class QuietHTTPServer(ThreadingHTTPServer):
    """Tests hang up on purpose (a client timeout, a cut stream): that is not worth a traceback
    on the console, which socketserver prints for every error in a handler."""
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FakeRemotes:
    def __init__(self):
        self.scripts: dict[str, list] = {"openai": [], "anthropic": [], "google": [], "github": []}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"remotes": self})
        self.server = QuietHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def script(self, remote: str, *actions) -> None:
        with self.lock:
            self.scripts[remote].extend(actions)

    def next_action(self, remote: str):
        with self.lock:
            return self.scripts[remote].pop(0) if self.scripts[remote] else ("ok", None)

    def seen(self, remote: str) -> list[dict]:
        return [r for r in self.requests if r["remote"] == remote]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    remotes: FakeRemotes
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _record(self, remote, body):
        self.remotes.requests.append({"remote": remote, "path": self.path, "headers": dict(self.headers), "body": body})

    def _send(self, code, body, headers=None, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: list[bytes], complete: bool):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for i, event in enumerate(events if complete else events[: max(1, len(events) // 2)]):
                if self.gate is not None and i == len(events) // 2:
                    self.gate.wait(60)
                self.wfile.write(event)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)
        self.close_connection = True

    def _common(self, remote):
        """Apply the scripted action; returns the reply text, or None if already answered."""
        action = self.remotes.next_action(remote)
        kind = action[0]
        if kind == "status":
            headers = action[2] if len(action) > 2 else {}
            self._send(action[1], {"error": {"message": f"scripted {action[1]}"}}, headers)
            return None, False
        if kind == "slow":
            time.sleep(action[1])
            return "slow answer", True
        if kind == "cut":
            return "this answer is cut off", False
        if kind == "hold":
            action[1].wait(60)
            return "held answer", True
        if kind == "gated":
            self.gate = action[2]
            return action[1], True
        if kind == "tool":
            self._tool_call(remote, action[1], action[2])
            return None, False
        text = action[1](self.body) if callable(action[1]) else action[1]
        return text or f"hello from {remote}", True

    def _tool_call(self, remote: str, name: str, arguments: dict) -> None:
        """Answer with a call of tool ``name``: streamed in pieces (the arguments' JSON split in
        two) when the request asked for a stream, else whole."""
        body, text = self.body, json.dumps(arguments)
        call_id = f"call_{len(self.remotes.requests)}"
        if remote == "openai":
            if body.get("stream"):
                def chunk(delta, finish=None):
                    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta,
                                                                "finish_reason": finish}]}).encode() + b"\n\n"
                events = [chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                                                      "function": {"name": name, "arguments": ""}}]}),
                          chunk({"tool_calls": [{"index": 0, "function": {"arguments": text[:len(text) // 2]}}]}),
                          chunk({"tool_calls": [{"index": 0, "function": {"arguments": text[len(text) // 2:]}}]}),
                          chunk({}, "tool_calls"), b"data: [DONE]\n\n"]
                self._stream(events, True)
            else:
                self._send(200, {"id": "x", "model": body.get("model"), "choices": [{"index": 0, "finish_reason": "tool_calls",
                           "message": {"role": "assistant", "content": None, "tool_calls": [
                               {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}]}}]})
        elif body.get("stream"):
            def ev(kind, data):
                return f"event: {kind}\ndata: {json.dumps(dict(data, type=kind))}\n\n".encode()
            self._stream([ev("message_start", {"message": {"model": body.get("model")}}),
                          ev("content_block_start", {"index": 0, "content_block": {"type": "tool_use", "id": call_id,
                                                                                   "name": name, "input": {}}}),
                          ev("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta",
                                                                           "partial_json": text[:len(text) // 2]}}),
                          ev("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta",
                                                                           "partial_json": text[len(text) // 2:]}}),
                          ev("content_block_stop", {"index": 0}),
                          ev("message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
                          ev("message_stop", {})], True)
        else:
            self._send(200, {"id": "m", "model": body.get("model"), "stop_reason": "tool_use", "usage": {},
                             "content": [{"type": "tool_use", "id": call_id, "name": name, "input": arguments}]})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = self.body = json.loads(self.rfile.read(length) or b"{}")
        self.gate = None
        remote = "openai" if urlparse(self.path).path.endswith("/chat/completions") else "anthropic"
        self._record(remote, body)
        if remote == "openai" and "rejected-key" in (self.headers.get("Authorization", "") + self.headers.get("api-key", "")):
            self._send(401, {"error": {"message": "invalid key"}})
            return
        text, complete = self._common(remote)
        if text is None:
            return
        words = text.split(" ")
        if remote == "openai":
            if body.get("stream"):
                events = [b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": w + " "},
                                                                "finish_reason": None}]}).encode() + b"\n\n"
                          for w in words]
                events += [b"data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode()
                           + b"\n\n", b"data: [DONE]\n\n"]
                self._stream(events, complete)
            elif complete:
                self._send(200, {"id": "x", "model": body.get("model"), "usage": {"completion_tokens": len(words)},
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}]})
            else:
                self._send(200, b'{"id": "x", "choices": [{"index": 0, "message": {"role": "assi')
        else:
            if body.get("stream"):
                def ev(name, data):
                    return f"event: {name}\ndata: {json.dumps(dict(data, type=name))}\n\n".encode()
                events = [ev("message_start", {"message": {"model": body.get("model")}}),
                          ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})]
                events += [ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w + " "}})
                           for w in words]
                events += [ev("content_block_stop", {"index": 0}),
                           ev("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}}),
                           ev("message_stop", {})]
                self._stream(events, complete)
            else:
                self._send(200, {"id": "m", "model": body.get("model"), "content": [{"type": "text", "text": text}],
                                 "stop_reason": "end_turn" if complete else None, "usage": {}})

    def _github(self, path: str, query: dict) -> None:
        self._record("github", {"path": path, "query": query})
        action = self.remotes.next_action("github")
        if action[0] == "status":
            self._send(action[1], {"message": f"scripted {action[1]}"})
        elif not self.headers.get("Authorization", "").startswith("Bearer "):
            self._send(401, {"message": "Requires authentication"})
        elif path in GITHUB:
            self._send(200, GITHUB[path])
        else:
            self._send(404, {"message": "Not Found"})

    def do_GET(self):
        url = urlparse(self.path)
        if url.path.startswith("/github/"):
            self._github(url.path.removeprefix("/github"), parse_qs(url.query))
            return
        query = parse_qs(urlparse(self.path).query)
        self._record("google", query)
        text, _ = self._common("google")
        if text is None:
            return
        q = query.get("q", [""])[0]
        n = int(query.get("num", ["5"])[0])
        self._send(200, {"items": [{"title": f"{q} result {i}", "link": f"https://example.org/{i}",
                                    "snippet": f"about {q}"} for i in range(n)]})
