"""What the model sees: the system prompt, relevant memories and search results, and as much
recent history as fits the token budget, newest first, never cutting a message in half."""
from __future__ import annotations

import math
from collections.abc import Callable

PER_MESSAGE = 4  # role and separators


def estimate_tokens(text: str) -> int:
    """A cautious count for models whose tokenizer is not at hand: one token per 3 bytes of
    UTF-8 (English averages about 4 characters a token, so this over-counts, as a budget must)."""
    return math.ceil(len(text.encode("utf-8")) / 3) + PER_MESSAGE


def system_text(system_prompt: str, memories: list[dict], results: list[dict]) -> str:
    parts = [system_prompt.strip() or "You are a helpful assistant."]
    if memories:
        parts.append("What you remember:\n" + "\n".join(f"- ({m['type']}) {m['content']}" for m in memories))
    if results:
        parts.append("Web search results (cite the links you use):\n" + "\n".join(
            f"- {r['title']} <{r['link']}>: {r.get('snippet', '')}" for r in results))
    return "\n\n".join(parts)


def fit_system(system_prompt: str, memories: list[dict], results: list[dict], limit: int,
               count: Callable[[str], int] = estimate_tokens) -> str:
    """The system text with as many of the (best-first) memories and results as fit ``limit``
    tokens, so retrieved context never crowds out the conversation itself."""
    memories, results = list(memories), list(results)
    text = system_text(system_prompt, memories, results)
    while count(text) > limit and (memories or results):
        (memories if len(memories) >= len(results) else results).pop()
        text = system_text(system_prompt, memories, results)
    return text


def build(system: str, history: list[dict], new_message: str, budget: int, reply_tokens: int,
          count: Callable[[str], int] = estimate_tokens) -> tuple[list[dict], list[dict]]:
    """Returns (messages for the model, history turns that did not fit, oldest first).

    The system text and the new message always go in; then history from the newest back, each
    turn whole or not at all, until the budget (less the reply's share) is spent."""
    room = budget - reply_tokens - count(system) - count(new_message)
    kept: list[dict] = []
    for i in range(len(history) - 1, -1, -1):
        cost = count(history[i]["content"])
        if cost > room:
            dropped = history[:i + 1]
            break
        room -= cost
        kept.append(history[i])
    else:
        dropped = []
    messages = [{"role": "system", "content": system}]
    messages += [{"role": m["role"], "content": m["content"]} for m in reversed(kept)]
    messages.append({"role": "user", "content": new_message})
    return messages, dropped


def summarize(turns: list[dict], limit: int = 1200) -> str:
    """An extractive summary of turns that no longer fit: the opening of each, in order."""
    lines = []
    for turn in turns:
        text = " ".join(turn["content"].split())
        lines.append(f"{turn['role']}: {text[:150]}{'...' if len(text) > 150 else ''}")
    summary = "Earlier in this conversation: " + " | ".join(lines)
    return summary if len(summary) <= limit else summary[:limit - 3] + "..."
