"""Plans: a request answered by several agents working through the queue.

A message posted with ``"plan": true`` is answered in three kinds of tasks:

1. its ``assistant.reply`` task plans: the model splits the request into sub-tasks, each with
   a role (strict JSON; the embedded model cannot do that, so then a few rules split it by its
   lines, sentences or "and"s). In one transaction it stores the plan, gives each step an agent
   (a session of its own, with a role prompt, and the step as its user message) and submits a
   chord: the agents side by side, then the join.
2. one ``assistant.agent`` task per step makes that agent's reply (words only, no tools);
3. ``assistant.join`` asks the model for the answer from the agents' replies and stores it as
   the reply to the user's message (streamed like any reply).

Everything is in the database, so ``GET .../messages/<id>/plan`` and the dashboard show each
step as it goes; a worker killed mid-plan leaves its task to run again, which finds what the
earlier run stored (the plan, an agent's reply: each stored at most once) and goes on from there.
"""
from __future__ import annotations

import json
import re
import uuid

from helpers import workflow
from helpers.validation import ASSISTANT_QUEUE as QUEUE
from lib.llm_providers import AllProvidersFailed, Local, ProviderChain, json_answer
from lib.stream import ReplyStream

PLANNER_PROMPT = """You plan work for a team of agents. Split the user's request into at most {n}
sub-tasks that agents can do independently, each with the agent's role. Answer with JSON only, exactly:
{{"steps": [{{"role": "who the agent is, e.g. a travel researcher", "task": "what this agent must do"}}]}}"""
AGENT_PROMPT = """You are {role}. You are one of several agents working on this request: "{request}".
Do only your part, and answer briefly."""
JOIN_PROMPT = """Your agents worked on parts of the user's request; their findings follow it.
Write the answer to the request from them. Say so where a finding is missing or they disagree."""
FINDING_CHARS = 1500  # of each agent's reply, in the join's prompt


def parse(answer: str, limit: int) -> list[dict] | None:
    """The planner's JSON answer as steps, or None when it is not exactly the asked format."""
    data = json_answer(answer)
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, list) or not steps:
        return None
    out = []
    for step in steps[:limit]:
        if not (isinstance(step, dict) and isinstance(step.get("task"), str) and step["task"].strip()):
            return None
        role = step.get("role") if isinstance(step.get("role"), str) and step["role"].strip() else "an assistant"
        out.append({"role": role.strip()[:200], "task": step["task"].strip()[:2000]})
    return out


# What opens a list item: "- ", "* ", "• " at a line's start, "1. " or "2) " there or inline.
ITEM = re.compile(r"(?:^[ \t]*(?:[-*•]|\d+[.)])|(?<=\s)\d+[.)])\s+", re.M)


def listed(request: str) -> list[str]:
    """The items of a list in ``request``, one per line or inline ("Plan a trip: 1. pick a
    city 2. book a hotel"), each with the words before the list ("Plan a trip: pick a city"),
    so an agent knows what its item is for; [] when there is no list of two or more."""
    text = request.strip()
    first = ITEM.search(text)
    if first is None:
        return []
    preamble, body = text[:first.start()].strip(), text[first.start():]
    items = [item.strip() for item in ITEM.split(body) if item.strip()]
    if len(items) < 2:
        return []
    lead = preamble.rstrip(":").strip()
    return [f"{lead}: {item}" if lead else item for item in items]


def by_rules(request: str, limit: int) -> list[dict]:
    """Steps without a model: a list's items (on lines or inline, with the words that lead
    into the list), else the sentences, else the clauses of "A, B and C" when each is a clause
    of its own ("summarize the logs, find errors and suggest fixes"; "compare Python, Rust and
    Go" is one task). When unsure, the whole request is one step. At most ``limit``: the last
    step takes what is left."""
    parts = listed(request)
    if len(parts) < 2:
        parts = [p.strip() for p in re.split(r"(?<=[.?!])\s+", request.strip()) if p.strip()]
    if len(parts) < 2 and re.search(r"\band\b", request):  # "A, B and C": the list's items
        clauses = [p.strip(" ,.") for p in re.split(r",\s*(?:and\s+)?|\s+and\s+", request.strip()) if p.strip(" ,.")]
        parts = clauses if all(len(clause.split()) >= 2 for clause in clauses) else []
    parts = parts[:limit - 1] + [" ".join(parts[limit - 1:])] if len(parts) > limit else parts
    if len(parts) < 2:
        return [{"role": "an assistant", "task": request.strip()}]
    return [{"role": f"agent {i} of {len(parts)}", "task": part} for i, part in enumerate(parts, 1)]


def make(assistant, message: dict, chain: ProviderChain) -> tuple[list[dict], str]:
    """The steps for ``message`` and who planned them (``model`` or ``rules``)."""
    limit = assistant.config.assistant_plan_max_agents
    if any(p.remote for p in chain.providers):
        try:
            answer = chain.chat([{"role": "system", "content": PLANNER_PROMPT.format(n=limit)},
                                 {"role": "user", "content": message["content"]}],
                                assistant.config.assistant_max_reply_tokens, prefer=message["preferred"])
            steps = parse(answer.text, limit)
            if steps:
                return steps, "model"
        except AllProvidersFailed:
            pass  # the rules still make a plan; the agents and the join will need a provider
    return by_rules(message["content"], limit), "rules"


def start(assistant, message: dict, chain: ProviderChain) -> dict:
    """Plan ``message`` (a user message row with its session's ``preferred`` and ``user_id``)
    and submit its agents and join, once."""
    db, message_id = assistant.db, message["id"]
    if db.execute("SELECT 1 FROM assistant_plans WHERE message_id = ?", (message_id,)):
        return {"message_id": message_id, "plan": "submitted before"}
    steps, planner = make(assistant, message, chain)
    now = assistant.clock()
    with db.transaction() as conn:
        if not conn.execute("INSERT INTO assistant_plans (message_id, planner, created_at) VALUES (?, ?, ?) "
                            "ON CONFLICT (message_id) DO NOTHING", (message_id, planner, now)).rowcount:
            return {"message_id": message_id, "plan": "submitted before"}
        agents = []
        for position, step in enumerate(steps):
            session_id = uuid.uuid4().hex
            conn.execute("INSERT INTO assistant_sessions (id, user_id, system_prompt, provider, metadata, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         (session_id, message["user_id"], AGENT_PROMPT.format(role=step["role"], request=message["content"]),
                          message["preferred"], json.dumps({"plan_of": message_id, "position": position}), now))
            agent_message = conn.execute("INSERT INTO assistant_messages (session_id, role, content, created_at) "
                                         "VALUES (?, 'user', ?, ?) RETURNING id",
                                         (session_id, step["task"], now)).fetchone()[0]
            agents.append((session_id, agent_message))
        flow = workflow.chord([workflow.step("assistant.agent", {"message_id": m}, queue=QUEUE, max_attempts=4,
                                             timeout=600) for _, m in agents],
                              workflow.step("assistant.join", {"message_id": message_id}, queue=QUEUE,
                                            max_attempts=4, timeout=600))
        ids = workflow.submit(db, flow, assistant.config, conn=conn)["ids"]
        for position, (step, (session_id, agent_message)) in enumerate(zip(steps, agents)):
            conn.execute("INSERT INTO assistant_plan_steps (message_id, position, role, instruction, session_id, "
                         "agent_message_id, task_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (message_id, position, step["role"], step["task"], session_id, agent_message, ids[position]))
            conn.execute("UPDATE assistant_messages SET task_id = ? WHERE id = ?", (ids[position], agent_message))
        conn.execute("UPDATE assistant_plans SET join_task = ? WHERE message_id = ?", (ids[-1], message_id))
        ReplyStream(db, message_id, assistant.clock).write("plan", {"planner": planner, "steps": steps}, conn)
    db.hint(QUEUE)
    return {"message_id": message_id, "plan": planner, "agents": len(steps)}


def view(db, message_id: int) -> dict | None:
    """The plan of a message, step by step: each agent's state and reply so far."""
    plan = db.execute("SELECT p.*, t.state AS join_state, t.last_error AS join_error, "
                      "(SELECT r.id FROM assistant_messages r WHERE r.reply_to = p.message_id) AS reply_id "
                      "FROM assistant_plans p LEFT JOIN tasks t ON t.id = p.join_task WHERE p.message_id = ?",
                      (message_id,))
    if not plan:
        return None
    rows = db.execute("""
        SELECT s.*, t.state AS task_state, t.attempts, t.last_error, r.id AS reply_id, r.content AS reply,
               r.provider AS reply_provider
        FROM assistant_plan_steps s LEFT JOIN tasks t ON t.id = s.task_id
        LEFT JOIN assistant_messages r ON r.reply_to = s.agent_message_id
        WHERE s.message_id = ? ORDER BY s.position""", (message_id,))
    steps = [{"position": r["position"], "role": r["role"], "instruction": r["instruction"],
              "session_id": r["session_id"], "task_id": r["task_id"], "attempts": r["attempts"],
              "state": "done" if r["reply_id"] else (r["task_state"] or "unknown"),
              "error": r["last_error"] if not r["reply_id"] else None,
              "reply": r["reply"], "provider": r["reply_provider"]} for r in rows]
    p = plan[0]
    state = "done" if p["reply_id"] else "joining" if p["join_state"] in ("queued", "running") else \
        "failed" if p["join_state"] in ("dead", "cancelled", "blocked") else "running"
    return {"message_id": message_id, "planner": p["planner"], "state": state, "join_task": p["join_task"],
            "join_error": p["join_error"] if state == "failed" else None, "reply_id": p["reply_id"],
            "created_at": p["created_at"], "steps": steps}


def join(assistant, message_id: int) -> dict:
    """The answer from the agents' replies, stored as the reply to the planned message."""
    message, chain = assistant.turn(message_id)
    if chain is None:
        return message  # nothing to do
    findings = [f"## {s['role']}: {s['instruction']}\n{(s['reply'] or '(no answer)')[:FINDING_CHARS]}"
                for s in view(assistant.db, message_id)["steps"]]
    system = (message["system_prompt"].strip() + "\n\n" if message["system_prompt"].strip() else "") + JOIN_PROMPT
    prompt = f"The request: {message['content']}\n\nWhat your agents found:\n\n" + "\n\n".join(findings)
    if isinstance(chain.providers[0], Local):  # a small context: the findings get what is left of it
        prompt = prompt[:max(500, (assistant.config.assistant_context_tokens - assistant.config.assistant_max_reply_tokens) * 2)]
    stream = ReplyStream(assistant.db, message_id, assistant.clock)
    answer = chain.chat([{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                        assistant.config.assistant_max_reply_tokens, prefer=message["preferred"], stream=stream)
    return assistant.store_reply(message, answer, stream)
